"""Renderers: pure functions from a report to text (JSON, markdown, GitHub) or a Rich renderable (tables); none imports torch."""

from __future__ import annotations

import enum

from bncli.errors import UsageError


class Format(str, enum.Enum):
    """The --format choices; `renderer_for` maps every member to one function."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    GITHUB = "github"
    SARIF = "sarif"


class UnsupportedFormat(UsageError):
    """A --format that exists but that this command cannot produce."""


# (command, format) -> "module:function" under bncli.render; imported only when chosen, so that `inspect`
# never pays for the diff renderers or Rich's table code when it writes JSON.
RENDERERS = {
    ("inspect", Format.TABLE): "table:inspect_table",
    ("inspect", Format.JSON): "json:inspect_json",
    ("inspect", Format.MARKDOWN): "markdown:inspect_markdown",
    ("inspect", Format.GITHUB): "github:inspect_github",
    ("inspect", Format.SARIF): "sarif:inspect_sarif",
    ("normalize", Format.TABLE): "table:normalize_table",
    ("normalize", Format.JSON): "json:normalize_json",
    ("diff", Format.TABLE): "diff:diff_table",
    ("diff", Format.JSON): "diff:diff_json",
    ("diff", Format.MARKDOWN): "diff:diff_markdown",
    ("diff", Format.GITHUB): "diff:diff_github",
    ("diff", Format.SARIF): "sarif:diff_sarif",
    ("recalibrate", Format.TABLE): "diff:recalibrate_table",
    ("recalibrate", Format.JSON): "diff:recalibrate_json",
    ("recalibrate", Format.MARKDOWN): "diff:recalibrate_markdown",
    ("recalibrate", Format.GITHUB): "diff:recalibrate_github",
}


def renderer_for(fmt: Format, command: str):
    """The render function for one command and one format."""
    import importlib

    fmt = Format(fmt)
    if (command, fmt) not in RENDERERS:
        offered = ", ".join(f.value for f in Format if (command, f) in RENDERERS)
        raise UnsupportedFormat(f"--format {fmt.value} is not available for `bncli {command}`; use one of: {offered}")
    module, _, function = RENDERERS[(command, fmt)].partition(":")
    return getattr(importlib.import_module(f"bncli.render.{module}"), function)
