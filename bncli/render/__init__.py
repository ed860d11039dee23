"""Renderers: pure functions from a report to text (JSON) or a Rich renderable (tables); none imports torch."""

from __future__ import annotations

import enum


class Format(str, enum.Enum):
    """The --format choices; `renderer_for` maps every member to one function."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"


def renderer_for(fmt: Format, command: str):
    """The render function for one command ('inspect' or 'normalize') and one format."""
    from bncli.render import diff, table
    from bncli.render import json as json_render

    renderers = {
        ("inspect", Format.TABLE): table.inspect_table,
        ("inspect", Format.JSON): json_render.inspect_json,
        ("normalize", Format.TABLE): table.normalize_table,
        ("normalize", Format.JSON): json_render.normalize_json,
        ("diff", Format.TABLE): diff.diff_table,
        ("diff", Format.JSON): diff.diff_json,
        ("diff", Format.MARKDOWN): diff.diff_markdown,
        ("recalibrate", Format.TABLE): diff.recalibrate_table,
        ("recalibrate", Format.JSON): diff.recalibrate_json,
        ("recalibrate", Format.MARKDOWN): diff.recalibrate_markdown,
    }
    github = getattr(Format, "GITHUB", None)  # added by the GitHub-annotations work; absent until it lands
    if github is not None:
        renderers[("diff", github)] = diff.diff_github
        renderers[("recalibrate", github)] = diff.recalibrate_github
    return renderers[(command, fmt)]
