"""`bncli inspect`: audit the BatchNorm layers of checkpoints, as a linter would (stable rule ids, CI-ready output)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bncli.commands.options import config_option, format_option, isolated_option, output_file_option, quiet_option, summary_option
from bncli.errors import ExitCode
from bncli.render import Format
from bncli.report import InspectReport, Severity

COMMAND = {
    "name": "inspect",
    "epilog": "Examples:  bncli inspect model.pt  ·  bncli inspect model.pt --layer features.1  ·  "
    "bncli inspect checkpoints/ 'runs/**/*.pt' --format github --fail-on warning  ·  "
    "bncli inspect model.pt --ignore dead-channel --max-var 1e6.  "
    "Rules: `bncli rules` lists them, `bncli rules BN004` explains one.  Settings may also come from the tool.bncli table of pyproject.toml; options win.",
}


class FailOn(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    NEVER = "never"


def exit_code(report: InspectReport, fail_on: FailOn | str) -> ExitCode:
    """INPUT when an input could not be read, else FINDINGS when a finding reaches --fail-on, else OK."""
    if report.unreadable:
        return ExitCode.INPUT
    fail_on = FailOn(fail_on)
    worst = report.worst()
    if fail_on is FailOn.NEVER or worst is None:
        return ExitCode.OK
    return ExitCode.FINDINGS if worst.rank >= Severity(fail_on.value).rank else ExitCode.OK


def _threshold(name: str, help: str, default: str):
    # The default is shown, not set: None lets [tool.bncli] fill in what the command line leaves out.
    return typer.Option(name, help=help, metavar="FLOAT", show_default=default, rich_help_panel="Thresholds")


def run(
    checkpoints: Annotated[
        list[str],
        typer.Argument(
            help="Checkpoints (.pt/.pth/.ckpt/.bin/.th, .safetensors, or any name), directories (every file whose "
            "first bytes are a checkpoint; the others are skipped and counted) or quoted glob patterns ('runs/**/*.pt').",
            show_default=False,
            metavar="PATH...",
        ),
    ],
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Show one layer, channel by channel.")] = None,
    fmt: Annotated[
        Optional[Format], format_option("inspect", default="table")
    ] = None,
    fail_on: Annotated[
        Optional[FailOn],
        typer.Option("--fail-on", help="Exit 1 on a finding of at least this severity.", show_default="error"),
    ] = None,
    select: Annotated[
        Optional[list[str]],
        typer.Option("--select", metavar="RULE", help="Run only these rules (ids or names; repeat or separate with commas)."),
    ] = None,
    ignore: Annotated[
        Optional[list[str]],
        typer.Option("--ignore", metavar="RULE", help="Do not report these rules (ids or names; repeat or comma-separate)."),
    ] = None,
    require_bn: Annotated[
        Optional[bool],
        typer.Option("--require-bn/--no-require-bn", help="A file without any BatchNorm layer is an error (BN011).", show_default="no-require-bn"),
    ] = None,
    eps: Annotated[Optional[float], _threshold("--eps", "The layers' eps in 1/sqrt(var + eps).", "1e-5")] = None,
    min_var: Annotated[Optional[float], _threshold("--min-var", "BN004: running_var below this is collapsed.", "eps")] = None,
    max_var: Annotated[Optional[float], _threshold("--max-var", "BN008: running_var above this is exploding.", "1e4")] = None,
    max_mean: Annotated[
        Optional[float], _threshold("--max-mean", "BN008: |running_mean| above this is exploding.", "100")
    ] = None,
    dead_weight: Annotated[
        Optional[float], _threshold("--dead-weight", "BN005: |weight| below this is a dead channel.", "1e-3")
    ] = None,
    max_fold_spread: Annotated[
        Optional[float],
        _threshold("--max-fold-spread", "BN015: a folded scale this many times the median is a risk.", "100"),
    ] = None,
    state: Annotated[
        Optional[str],
        typer.Option("--state", help="Key of the state dict inside the checkpoint, e.g. 'ema'.", show_default="found automatically"),
    ] = None,
    strip_prefix: Annotated[
        Optional[str],
        typer.Option("--strip-prefix", help="Remove a prefix every key shares, e.g. 'model.' in a Lightning checkpoint."),
    ] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="Tables with every column, however narrow the terminal (lines may be longer).")
    ] = False,
    output_file: Annotated[Optional[Path], output_file_option()] = None,
    summary: Annotated[Optional[Path], summary_option()] = None,
    config: Annotated[Optional[Path], config_option()] = None,
    isolated: Annotated[bool, isolated_option()] = False,
    quiet: Annotated[bool, quiet_option()] = False,
) -> None:
    """Audit the running statistics and affine parameters of every BatchNorm layer in checkpoints.

    A BatchNorm layer is any key prefix with both running_mean and running_var; names need not contain "bn".
    Flags NaN/Inf, negative, collapsed or exploding variances, statistics never updated, dead channels and more:
    each finding carries a stable rule id (BN001...): `bncli rules ID` says what it means and how to fix it.
    Exit status: 3 if any input could not be read, else 1 if a finding reached --fail-on, else 0.
    """
    from bncli.audit import expand_inputs, inspect_files
    from bncli.config import load_config, resolve_inspect
    from bncli.console import error_line, warn
    from bncli.delivery import append_summary, deliver
    from bncli.render import renderer_for
    from bncli.render.common import summary_line

    loaded = load_config(path=config, isolated=isolated)
    for message in loaded.warnings:
        warn(message)
    options = {
        "format": fmt, "fail-on": fail_on, "select": select, "ignore": ignore, "require-bn": require_bn,
        "eps": eps, "min-var": min_var, "max-var": max_var, "max-mean": max_mean, "dead-weight": dead_weight,
        "max-fold-spread": max_fold_spread,
    }  # fmt: skip
    settings = resolve_inspect(options, loaded)
    render = renderer_for(Format(settings.format), "inspect")  # before the audit: a bad format fails fast

    report = inspect_files(
        expand_inputs(checkpoints),
        layer=layer,
        state=state,
        thresholds=settings.thresholds,
        selected=settings.selected,
        require_bn=settings.require_bn,
        strip_prefix=strip_prefix,
    )
    for file in report.unreadable:
        error_line(file.error or "")  # the audit goes on with the other inputs
    deliver(summary_line(report) if quiet and settings.format == Format.TABLE.value else render(report), output_file, wide=wide)
    if summary is not None:
        append_summary(summary, renderer_for(Format.MARKDOWN, "inspect")(report))
    code = exit_code(report, settings.fail_on)
    if code:
        raise typer.Exit(code)

