"""Shared fixtures: a CLI runner with a fixed width and no colour, and small checkpoints built on the fly."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_data"


class Result:
    """What one CLI call did: exit code, stdout, stderr (separate), and the exception if one escaped."""

    def __init__(self, result) -> None:
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception

    def __repr__(self) -> str:
        return f"<Result exit={self.exit_code} stdout={self.stdout[-400:]!r} stderr={self.stderr[-400:]!r}>"


@pytest.fixture
def cli():
    """Run `bncli ARGS...` in-process; stdout and stderr are kept apart."""
    from bncli.cli import app

    runner = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb"})

    def invoke(*args: str | Path) -> Result:
        return Result(runner.invoke(app, [str(a) for a in args]))

    return invoke


def bn_state(channels: int = 4, prefix: str = "bn", seed: int = 0, affine: bool = True) -> OrderedDict:
    """The state dict of one trained-looking BatchNorm2d layer under `prefix`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    if affine:
        sd[f"{prefix}.weight"] = torch.rand(channels, generator=g) + 0.5
        sd[f"{prefix}.bias"] = torch.randn(channels, generator=g) * 0.1
    sd[f"{prefix}.running_mean"] = torch.randn(channels, generator=g)
    sd[f"{prefix}.running_var"] = torch.rand(channels, generator=g) + 0.5
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(100)
    return sd


@pytest.fixture
def make_ckpt(tmp_path):
    """Save a state dict (or any object) with torch.save and return its path."""
    import torch

    def save(obj, name: str = "ckpt.pt") -> Path:
        path = tmp_path / name
        torch.save(obj, path)
        return path

    return save
