"""Where a report goes: stdout, or the file of --output-file (written atomically), and --summary's markdown.

Design (issue 14): `--output-file PATH` replaces stdout for the report, whatever the format; the exit code and
the stderr lines do not change. `--summary PATH` (inspect, diff) appends the markdown report to PATH in one
write, as `>> "$GITHUB_STEP_SUMMARY"` would, so one run can print annotations (`--format github`) and write
the job summary. normalize and recalibrate already have `--output/-o` for the tensor or checkpoint they write:
there the report's file is `--output-file` without a short form.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

FILE_WIDTH = 160  # a table written to a file has no terminal: the width bncli uses when stdout is piped


def file_text(rendered, wide: bool = False) -> str:
    """A rendered report as the text a file gets: strings as they are, Rich renderables without colour, at the
    width of a piped stdout (every column with --wide), trailing spaces removed."""
    if isinstance(rendered, str):
        return rendered
    from rich.console import Console

    from bncli.console import no_command_lines, render
    from bncli.render.layout import WIDE

    width = WIDE if wide else FILE_WIDTH
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False, highlight=False)
    lines = no_command_lines(render(rendered, console)).rstrip("\n").split("\n")
    return "\n".join(line.rstrip() for line in lines)  # Rich pads every line to the width


def deliver(rendered, output_file: Path | None = None, wide: bool = False) -> None:
    """The report on stdout, or atomically in `output_file` (an error leaves the old file untouched)."""
    if output_file is None:
        from bncli.console import emit

        emit(rendered, wide=wide)
        return
    from bncli.atomic import write_atomic

    data = (file_text(rendered, wide) + "\n").encode("utf-8", "surrogateescape")
    write_atomic(output_file, lambda fh: fh.write(data))


def append_summary(path: Path, markdown: str) -> None:
    """Append the markdown report to `path` in one write (O_APPEND): what `>> "$GITHUB_STEP_SUMMARY"` does."""
    from bncli.errors import InputError

    data = (markdown.rstrip("\n") + "\n\n").encode("utf-8", "surrogateescape")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the summary: {exc.strerror or exc}") from None
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise InputError(f"{path}: cannot write the summary: short write ({written} of {len(data)} bytes)")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the summary: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
