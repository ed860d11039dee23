"""bncli: audit and apply BatchNorm layers from PyTorch checkpoints, without the model's code.

The Python API (see the README): `bncli.inspect(paths, **options)`, `bncli.diff(a, b, **options)`,
`bncli.recalibrate(model, batches, forward=None, layers=None)` and `bncli.watch(model, optimizer=None, ...)`
(with `bncli.BatchNormDefect` and `bncli.BatchNormWarning`). Importing bncli imports none of torch, numpy or
Rich: each name is resolved on first use.
"""

__version__ = "0.1.0"

__all__ = ["BatchNormDefect", "BatchNormWarning", "__version__", "diff", "inspect", "recalibrate", "watch"]


def __getattr__(name: str):
    if name == "inspect":
        from bncli.api import inspect

        return inspect
    if name in ("BatchNormDefect", "BatchNormWarning"):
        import importlib

        return getattr(importlib.import_module("bncli.watch"), name)
    if name in ("diff", "recalibrate", "watch"):
        import importlib

        return importlib.import_module(f"bncli.{name}")  # a callable module: bncli.api's function of that name
    raise AttributeError(f"module 'bncli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
