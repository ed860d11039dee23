"""`bncli rules`: the rule catalogue, from the package itself (what each rule detects, why it matters, how to fix it)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bncli.commands.options import output_file_option

COMMAND = {
    "name": "rules",
    "epilog": "Examples:  bncli rules  ·  bncli rules BN004  ·  bncli rules collapsed-variance  ·  bncli rules --format json",
}


class RulesFormat(str, enum.Enum):
    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"


def run(
    rule: Annotated[
        Optional[str],
        typer.Argument(help="A rule id or name (BN004, collapsed-variance); all rules when omitted.", show_default=False,
                       metavar="RULE"),
    ] = None,
    fmt: Annotated[RulesFormat, typer.Option("--format", "-f", help="Output format.")] = RulesFormat.TABLE,
    output_file: Annotated[Optional[Path], output_file_option()] = None,
) -> None:
    """List the audit rules, or explain one: what it detects, why it matters and how to fix it.

    docs/rules.md is generated from the same text (`bncli rules --format markdown`).
    """
    import shutil

    from bncli import ruledoc
    from bncli.delivery import deliver
    from bncli.rules import rule_by_key

    chosen = [rule_by_key(rule)] if rule is not None else None  # an unknown rule: exit 2 with the nearest names
    fmt = RulesFormat(fmt)
    if fmt is RulesFormat.JSON:
        deliver(ruledoc.as_json(chosen), output_file)
    elif fmt is RulesFormat.MARKDOWN:
        deliver(ruledoc.markdown(chosen), output_file)
    elif chosen is None:
        deliver(ruledoc.listing(_width(output_file)), output_file)
    else:
        deliver(ruledoc.explain(chosen[0], shutil.get_terminal_size((100, 24)).columns), output_file)


def _width(output_file) -> int | None:
    """The terminal's width; None (no wrapping) for a file or a pipe, as tables get the piped layout."""
    import os
    import shutil
    import sys

    if output_file is not None or (not sys.stdout.isatty() and "COLUMNS" not in os.environ):
        return None
    return shutil.get_terminal_size((100, 24)).columns
