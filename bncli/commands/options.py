"""Option callbacks shared by several commands."""

from __future__ import annotations

import math

import typer


def check_eps(value: float | None) -> float | None:
    """eps >= 0: torchvision's FrozenBatchNorm2d models use 0 (`overwrite_eps(model, 0.0)`); None: not given."""
    if value is None:
        return None
    if not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter("eps must be a finite number >= 0")
    return value


def format_option(command: str, help: str = "Output format.", default: str | None = None):
    """--format/-f with only the formats this command can write in its help (`[table|json]` for normalize)."""
    from bncli.render import RENDERERS, Format

    offered = [f.value for f in Format if (command, f) in RENDERERS]

    def parse(value):
        if isinstance(value, Format):
            return value
        try:
            return Format(value)  # a format another command has: renderer_for says which this one offers
        except ValueError:
            raise typer.BadParameter(f"{str(value)!r} is not one of {', '.join(offered)}.") from None

    extra = {"show_default": default} if default is not None else {}
    return typer.Option("--format", "-f", help=help, metavar=f"[{'|'.join(offered)}]", parser=parse, **extra)


def output_file_option(short: bool = True):
    """--output-file (and -o where the command has no --output of its own): the report goes to a file."""
    names = ("--output-file", "-o") if short else ("--output-file",)
    return typer.Option(
        *names,
        metavar="PATH",
        help="Write the report to PATH (atomically, replacing it) instead of stdout; the exit code is the same.",
        show_default=False,
    )


def summary_option():
    return typer.Option(
        "--summary",
        metavar="PATH",
        help='Also append the markdown report to PATH, e.g. "$GITHUB_STEP_SUMMARY" with --format github.',
        show_default=False,
    )


def require_torch(command: str) -> None:
    """normalize and recalibrate run PyTorch; without it (`pip install bncli` is the audit only) say which extra."""
    try:
        import torch  # noqa: F401 - the command imports it next anyway
    except ImportError:
        from bncli.errors import InputError

        raise InputError(
            f"`bncli {command}` needs PyTorch, which is not installed here: pip install 'bncli[torch]' "
            "(inspect, diff and rules work without it)"
        ) from None


def config_option():
    return typer.Option(
        "--config",
        metavar="PATH",
        help="Read the settings from this file: a pyproject.toml ([tool.bncli]) or a TOML file of bncli settings.",
        show_default="the nearest pyproject.toml",
    )


def isolated_option():
    return typer.Option("--isolated", help="Ignore every configuration file: only the command line and the defaults.")


def quiet_option():
    return typer.Option("--quiet", "-q", help="Print only the summary line (and errors) instead of the table.")
