"""Option callbacks shared by several commands."""

from __future__ import annotations

import typer


def check_eps(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter("eps must be greater than 0")
    return value
