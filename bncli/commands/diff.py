"""`bncli diff`: compare the BatchNorm statistics of two checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bncli.commands.options import (
    check_eps,
    config_option,
    format_option,
    isolated_option,
    output_file_option,
    quiet_option,
    summary_option,
)
from bncli.errors import ExitCode, UsageError
from bncli.render import Format

COMMAND = {
    "name": "diff",
    "epilog": "Examples:  bncli diff before.pt after.pt  ·  bncli diff a.pt b.safetensors --layer features.1  ·  "
    "bncli diff base.pt finetuned.pt --only 'backbone.*' --fail-on-change  ·  "
    "bncli diff ckpt.pt ckpt.pt --state-a model --state-b model_ema  ·  bncli diff model.pt lightning.ckpt --strip-prefix-b model",
}


def exit_code(report) -> ExitCode:
    """FINDINGS when a CI expectation is violated: something changed (frozen), or some layer did not (fine-tuned)."""
    return ExitCode.FINDINGS if report.failed else ExitCode.OK


def run(
    a: Annotated[Path, typer.Argument(help="The reference checkpoint (A).", show_default=False)],
    b: Annotated[Path, typer.Argument(help="The checkpoint compared with it (B).", show_default=False)],
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Compare one layer, channel by channel.")] = None,
    fmt: Annotated[Optional[Format], format_option("diff", default="table")] = None,
    fail_on_change: Annotated[
        bool, typer.Option("--fail-on-change", help="Exit 1 if any BatchNorm layer differs (frozen BatchNorm must stay frozen).")
    ] = False,
    fail_if_unchanged: Annotated[
        bool,
        typer.Option("--fail-if-unchanged", help="Exit 1 if any BatchNorm layer is identical (fine-tuning must update all)."),
    ] = False,
    eps: Annotated[
        Optional[float],
        typer.Option("--eps", callback=check_eps, metavar="FLOAT", show_default="1e-5", help="Added to var_A in the mean shift, and to var_A and var_B in the KL."),
    ] = None,
    only: Annotated[
        Optional[list[str]],
        typer.Option("--only", metavar="GLOB", help="Compare only the layers whose names match (repeatable), e.g. 'head.*'."),
    ] = None,
    exclude: Annotated[
        Optional[list[str]],
        typer.Option("--exclude", metavar="GLOB", help="Leave out the layers whose names match (repeatable)."),
    ] = None,
    atol: Annotated[
        Optional[float],
        typer.Option("--atol", metavar="FLOAT", show_default="0", help="A value within atol + rtol * |A| of A's counts as unchanged."),
    ] = None,
    rtol: Annotated[
        Optional[float], typer.Option("--rtol", metavar="FLOAT", show_default="0", help="The relative part of --atol's tolerance.")
    ] = None,
    state: Annotated[
        Optional[str], typer.Option("--state", help="Key of the state dict inside both checkpoints, e.g. 'ema'.")
    ] = None,
    state_a: Annotated[
        Optional[str], typer.Option("--state-a", help="The same for A only: diff ckpt.pt ckpt.pt --state-a model --state-b model_ema.")
    ] = None,
    state_b: Annotated[Optional[str], typer.Option("--state-b", help="The same for B only.")] = None,
    strip_prefix: Annotated[
        Optional[str],
        typer.Option("--strip-prefix", help="Remove a prefix every key of both files shares, e.g. 'model.' (Lightning)."),
    ] = None,
    strip_prefix_a: Annotated[Optional[str], typer.Option("--strip-prefix-a", help="The same for A only.")] = None,
    strip_prefix_b: Annotated[
        Optional[str], typer.Option("--strip-prefix-b", help="The same for B only: diff model.pt lightning.ckpt --strip-prefix-b model.")
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
    """Compare the BatchNorm layers of two checkpoints, matched by name after stripping 'module.'/'_orig_mod.'.

    Per layer: the largest mean shift in units of A's std, the range of var_B / var_A, the mean symmetric KL
    divergence between the per-channel Gaussians, the change in num_batches_tracked, weight and bias,
    and a verdict: identical (every value equal), changed, or shape-changed.
    Other prefixes (Lightning's 'model.') are stripped only when asked: --strip-prefix for both files,
    --strip-prefix-a/-b for one; every key of that file must then start with the prefix.
    --only/--exclude pick layers by name (globs); --atol/--rtol let float noise count as identical;
    --state-a/--state-b compare two state dicts of one file (the model and its EMA).
    """
    from bncli.config import load_config, resolve_diff
    from bncli.console import note, warn
    from bncli.delivery import append_summary, deliver
    from bncli.diff import FAIL_IF_UNCHANGED, FAIL_ON_CHANGE, diff_files
    from bncli.render import renderer_for
    from bncli.render.diff import summary_line

    loaded = load_config(path=config, isolated=isolated)
    settings = resolve_diff(
        {"format": fmt, "eps": eps, "atol": atol, "rtol": rtol, "fail-on-change": fail_on_change,
         "fail-if-unchanged": fail_if_unchanged}, loaded,
    )  # fmt: skip
    fmt, eps, atol, rtol = Format(settings["format"]), settings["eps"], settings["atol"], settings["rtol"]
    fail_on_change, fail_if_unchanged = settings["fail-on-change"], settings["fail-if-unchanged"]
    if fail_on_change and fail_if_unchanged:
        raise UsageError("--fail-on-change and --fail-if-unchanged cannot be used together")
    gate = FAIL_ON_CHANGE if fail_on_change else FAIL_IF_UNCHANGED if fail_if_unchanged else None
    if strip_prefix is not None:
        if strip_prefix_a is not None or strip_prefix_b is not None:
            raise UsageError("--strip-prefix applies to both files: use it without --strip-prefix-a/--strip-prefix-b")
        strip_prefix_a = strip_prefix_b = strip_prefix
    render = renderer_for(fmt, "diff")
    report = diff_files(
        a, b, layer=layer, eps=eps, state=state, state_a=state_a, state_b=state_b, strip_prefix_a=strip_prefix_a,
        strip_prefix_b=strip_prefix_b, only=only or (), exclude=exclude or (), atol=atol, rtol=rtol, gate=gate,
    )  # fmt: skip
    from bncli.render.diff import prefix_hint

    hint = prefix_hint(report)
    if hint:
        warn(hint)
    deliver(summary_line(report) if quiet and fmt is Format.TABLE else render(report), output_file, wide=wide)
    if summary is not None:
        append_summary(summary, renderer_for(Format.MARKDOWN, "diff")(report))
    code = exit_code(report)
    if code:
        from bncli.render.diff import gate_message

        note(gate_message(report))
        raise typer.Exit(code)
