"""Per-channel statistics of (N, C, H, W) tensors, accumulated in float64 whatever the input dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


def channel_mean_std(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (correction=1, as torch.Tensor.std) of every channel over N, H and W.

    One channel at a time in float64: a float32 sum over millions of values loses digits, and
    converting the whole tensor at once would double or quadruple peak memory.
    """
    import numpy as np
    import torch

    channels = x.shape[1]
    mean = np.empty(channels, dtype=np.float64)
    std = np.empty(channels, dtype=np.float64)
    for c in range(channels):
        values = x.select(1, c).to(torch.float64)
        if values.numel() > 1:
            var, mu = torch.var_mean(values, correction=1)
            mean[c], std[c] = mu.item(), var.sqrt().item()
        else:  # one value: the mean is defined, the corrected std is not (torch gives nan too)
            mean[c], std[c] = values.mean().item(), float("nan")
    return mean, std
