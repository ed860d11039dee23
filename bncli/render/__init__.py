"""Renderers: pure functions from a report to text (JSON, markdown, GitHub) or a Rich renderable (tables); none imports torch."""

from __future__ import annotations

import enum

from bncli.errors import BncliError, ExitCode


class Format(str, enum.Enum):
    """The --format choices; `renderer_for` maps every member to one function."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    GITHUB = "github"


class UnsupportedFormat(BncliError):
    """A --format that exists but that this command cannot produce."""

    exit_code = ExitCode.USAGE


def renderer_for(fmt: Format, command: str):
    """The render function for one command and one format."""
    from bncli.render import diff, github, markdown, table
    from bncli.render import json as json_render

    renderers = {
        ("inspect", Format.TABLE): table.inspect_table,
        ("inspect", Format.JSON): json_render.inspect_json,
        ("inspect", Format.MARKDOWN): markdown.inspect_markdown,
        ("inspect", Format.GITHUB): github.inspect_github,
        ("normalize", Format.TABLE): table.normalize_table,
        ("normalize", Format.JSON): json_render.normalize_json,
        ("diff", Format.TABLE): diff.diff_table,
        ("diff", Format.JSON): diff.diff_json,
        ("diff", Format.MARKDOWN): diff.diff_markdown,
        ("diff", Format.GITHUB): diff.diff_github,
        ("recalibrate", Format.TABLE): diff.recalibrate_table,
        ("recalibrate", Format.JSON): diff.recalibrate_json,
        ("recalibrate", Format.MARKDOWN): diff.recalibrate_markdown,
        ("recalibrate", Format.GITHUB): diff.recalibrate_github,
    }
    fmt = Format(fmt)
    if (command, fmt) not in renderers:
        offered = ", ".join(f.value for f in Format if (command, f) in renderers)
        raise UnsupportedFormat(f"--format {fmt.value} is not available for `bncli {command}`; use one of: {offered}")
    return renderers[(command, fmt)]
