"""`bncli diff`: compare the BatchNorm statistics of two checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bncli.commands.options import check_eps, format_option
from bncli.errors import ExitCode, UsageError
from bncli.render import Format

COMMAND = {
    "name": "diff",
    "epilog": "Examples:  bncli diff before.pt after.pt  ·  bncli diff a.pt b.safetensors --layer features.1  ·  "
    "bncli diff base.pt finetuned.pt --fail-on-change  ·  bncli diff model.pt lightning.ckpt --strip-prefix-b model",
}


def exit_code(changed: tuple[str, ...], unchanged: tuple[str, ...], fail_on_change: bool, fail_if_unchanged: bool) -> ExitCode:
    """FINDINGS when a CI expectation is violated: something changed (frozen), or some layer did not (fine-tuned)."""
    if fail_on_change and changed:
        return ExitCode.FINDINGS
    if fail_if_unchanged and (unchanged or not (changed or unchanged)):
        return ExitCode.FINDINGS
    return ExitCode.OK


def run(
    a: Annotated[Path, typer.Argument(help="The reference checkpoint (A).", show_default=False)],
    b: Annotated[Path, typer.Argument(help="The checkpoint compared with it (B).", show_default=False)],
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Compare one layer, channel by channel.")] = None,
    fmt: Annotated[Format, format_option("diff")] = Format.TABLE,
    fail_on_change: Annotated[
        bool, typer.Option("--fail-on-change", help="Exit 1 if any BatchNorm layer differs (frozen BatchNorm must stay frozen).")
    ] = False,
    fail_if_unchanged: Annotated[
        bool,
        typer.Option("--fail-if-unchanged", help="Exit 1 if any BatchNorm layer is identical (fine-tuning must update all)."),
    ] = False,
    eps: Annotated[
        float,
        typer.Option("--eps", callback=check_eps, help="Added to var_A in the mean shift, and to var_A and var_B in the KL."),
    ] = 1e-5,
    state: Annotated[
        Optional[str], typer.Option("--state", help="Key of the state dict inside both checkpoints, e.g. 'ema'.")
    ] = None,
    strip_prefix: Annotated[
        Optional[str],
        typer.Option("--strip-prefix", help="Remove a prefix every key of both files shares, e.g. 'model.' (Lightning)."),
    ] = None,
    strip_prefix_a: Annotated[Optional[str], typer.Option("--strip-prefix-a", help="The same for A only.")] = None,
    strip_prefix_b: Annotated[
        Optional[str], typer.Option("--strip-prefix-b", help="The same for B only: diff model.pt lightning.ckpt --strip-prefix-b model.")
    ] = None,
) -> None:
    """Compare the BatchNorm layers of two checkpoints, matched by name after stripping 'module.'/'_orig_mod.'.

    Per layer: the largest mean shift in units of A's std, the range of var_B / var_A, the mean symmetric KL
    divergence between the per-channel Gaussians, the change in num_batches_tracked, weight and bias,
    and a verdict: identical (every value equal), changed, or shape-changed.
    Other prefixes (Lightning's 'model.') are stripped only when asked: --strip-prefix for both files,
    --strip-prefix-a/-b for one; every key of that file must then start with the prefix.
    """
    from bncli.cli import emit, stderr_console
    from bncli.diff import diff_files
    from bncli.render import renderer_for

    if fail_on_change and fail_if_unchanged:
        raise UsageError("--fail-on-change and --fail-if-unchanged cannot be used together")
    if strip_prefix is not None:
        if strip_prefix_a is not None or strip_prefix_b is not None:
            raise UsageError("--strip-prefix applies to both files: use it without --strip-prefix-a/--strip-prefix-b")
        strip_prefix_a = strip_prefix_b = strip_prefix
    report = diff_files(a, b, layer=layer, eps=eps, state=state, strip_prefix_a=strip_prefix_a, strip_prefix_b=strip_prefix_b)
    emit(renderer_for(fmt, "diff")(report))
    code = exit_code(report.changed, report.unchanged, fail_on_change, fail_if_unchanged)
    if code:
        stderr_console().print(_why(report.changed if fail_on_change else report.unchanged, fail_on_change), markup=False)
        raise typer.Exit(code)


def _why(names: tuple[str, ...], fail_on_change: bool) -> str:
    if not names:
        return "--fail-if-unchanged: no BatchNorm layer is in both checkpoints"
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    if fail_on_change:
        return f"--fail-on-change: {len(names)} BatchNorm layer{'s' if len(names) != 1 else ''} changed: {shown}"
    return f"--fail-if-unchanged: {len(names)} BatchNorm layer{'s' if len(names) != 1 else ''} unchanged: {shown}"
