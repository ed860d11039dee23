"""bncli: audit and apply BatchNorm layers from PyTorch checkpoints, without the model's code."""

__version__ = "0.1.0"

__all__ = ["__version__"]
