"""Option callbacks shared by several commands."""

from __future__ import annotations

import math

import typer


def check_eps(value: float) -> float:
    """eps >= 0: torchvision's FrozenBatchNorm2d models use 0 (`overwrite_eps(model, 0.0)`)."""
    if not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter("eps must be a finite number >= 0")
    return value
