"""bncli: audit and apply BatchNorm layers from PyTorch checkpoints, without the model's code.

The Python API (see the README): `bncli.inspect(paths, **options)`, `bncli.diff(a, b, **options)` and
`bncli.recalibrate(model, batches, forward=None, layers=None)`. Importing bncli imports none of torch, numpy or
Rich: each name is resolved on first use.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "diff", "inspect", "recalibrate"]


def __getattr__(name: str):
    if name == "inspect":
        from bncli.api import inspect

        return inspect
    if name in ("diff", "recalibrate"):
        import importlib

        return importlib.import_module(f"bncli.{name}")  # a callable module: bncli.api's function of that name
    raise AttributeError(f"module 'bncli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
