"""`bncli inspect`: audit the BatchNorm layers of a checkpoint."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bncli.errors import ExitCode
from bncli.render import Format
from bncli.report import InspectReport, Severity

COMMAND = {
    "name": "inspect",
    "epilog": "Examples:  bncli inspect model.pt  ·  bncli inspect model.pt --layer features.1  ·  "
    "bncli inspect model.safetensors --format json --fail-on warning",
}


class FailOn(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    NEVER = "never"


def exit_code(report: InspectReport, fail_on: FailOn) -> ExitCode:
    """FINDINGS when a finding reaches --fail-on, else OK."""
    worst = report.worst()
    if fail_on is FailOn.NEVER or worst is None:
        return ExitCode.OK
    return ExitCode.FINDINGS if worst.rank >= Severity(fail_on.value).rank else ExitCode.OK


def run(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint: .pt/.pth/.ckpt/.bin/.th (torch) or .safetensors.", show_default=False)
    ],
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Show one layer, channel by channel.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.TABLE,
    fail_on: Annotated[FailOn, typer.Option("--fail-on", help="Exit 1 when a finding has at least this severity.")] = FailOn.ERROR,
    state: Annotated[
        Optional[str],
        typer.Option("--state", help="Key of the state dict inside the checkpoint, e.g. 'ema' (default: found automatically)."),
    ] = None,
    strip_prefix: Annotated[
        Optional[str],
        typer.Option("--strip-prefix", help="Remove a prefix every key shares, e.g. 'model.' in a Lightning checkpoint."),
    ] = None,
) -> None:
    """Audit the running statistics and affine parameters of every BatchNorm layer in a checkpoint.

    A BatchNorm layer is any key prefix with both running_mean and running_var; names need not contain "bn".
    Flags NaN/Inf, negative or collapsed variances, statistics never updated, and dead channels (|weight| ~ 0).
    """
    from bncli.audit import inspect_files
    from bncli.cli import emit
    from bncli.render import renderer_for

    report = inspect_files([checkpoint], layer=layer, state=state, strip_prefix=strip_prefix)
    emit(renderer_for(fmt, "inspect")(report))
    code = exit_code(report, fail_on)
    if code:
        raise typer.Exit(code)
