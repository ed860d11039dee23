"""Per-channel statistics of (N, C, H, W) tensors: float32 speed, float64 accuracy, small blocks of extra memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

BLOCK_BYTES = 4 << 20  # images per block: the scratch fits in cache, so the passes over it cost little next to reading x
# A shift within this many stds of the mean at most doubles the variance's rounding error (~(1 + k^2) eps):
# still near 1e-7. The first image's mean is usually well within it; a batch that drifts gets a second pass.
SHIFT_TOLERANCE = 1.0


def block_size(x: torch.Tensor) -> int:
    """How many images make one block of about BLOCK_BYTES (at least one)."""
    per_image = x[0].numel() * max(4, x.element_size())
    return max(1, BLOCK_BYTES // max(1, per_image))


class ChannelMoments:
    """Running sums of d = x - shift per channel, fed one block of images at a time.

    mean = shift + sum(d)/n and var = (sum(d^2) - sum(d)^2/n)/(n-1). Each (image, channel) row of H*W values is
    summed by torch in float32 (float64 for float64 input), whose pairwise summation keeps the error near eps;
    rows are combined in float64. With the shift near the mean nothing cancels, so mean and std come out with
    a relative error around 1e-7 or better. The shift is the first block's mean unless given; `far()` says when it
    turned out too far from the mean for that guarantee, and the caller then repeats the pass with a better one.
    """

    def __init__(self, channels: int, dtype, shift: torch.Tensor | None = None) -> None:
        import torch

        self.work = torch.float64 if dtype == torch.float64 else torch.float32
        self.shift = None if shift is None else shift.to(self.work)
        self.s1 = torch.zeros(channels, dtype=torch.float64)
        self.s2 = torch.zeros(channels, dtype=torch.float64)
        self.count = 0
        self._scratch = None

    def add(self, block: torch.Tensor) -> None:
        import torch

        b, c = block.shape[0], block.shape[1]
        rows = block.reshape(b, c, -1)  # a view for NCHW-contiguous input, a block-sized copy otherwise
        if rows.shape[2] == 0:
            return
        if self.shift is None:
            self.shift = rows[0].sum(-1, dtype=self.work) / rows.shape[2]
        if self._scratch is None or self._scratch.shape[0] < b or self._scratch.shape[2] != rows.shape[2]:
            self._scratch = torch.empty((b, c, rows.shape[2]), dtype=self.work)
        d = self._scratch[:b]
        torch.sub(rows, self.shift[:, None], out=d)
        self.s1 += d.sum(-1).sum(0, dtype=torch.float64)
        d.square_()
        self.s2 += d.sum(-1).sum(0, dtype=torch.float64)
        self.count += b * rows.shape[2]

    def _offset_var(self):
        import torch

        offset = self.s1 / self.count
        if self.count < 2:  # one value: the mean is defined, the corrected std is not (torch gives nan too)
            return offset, torch.full_like(offset, float("nan"))
        return offset, ((self.s2 - self.s1 * offset) / (self.count - 1)).clamp(min=0)

    def far(self) -> bool:
        """True when some channel's mean is far from the shift (measured in its stds): sum again around the mean."""
        if self.count < 2:
            return False
        offset, var = self._offset_var()
        return bool((offset.abs() > SHIFT_TOLERANCE * var.sqrt()).any())

    def mean_guess(self):
        offset, _ = self._offset_var()
        return self.shift.double() + offset

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        if self.count == 0:
            nan = np.full(self.s1.shape[0], np.nan)
            return nan, nan.copy()
        offset, var = self._offset_var()
        return (self.shift.double() + offset).numpy(), var.sqrt().numpy()


def channel_mean_std(x: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (correction=1, as torch.Tensor.std) of every channel over N, H and W, in float64."""
    moments = _pass(x, shift)
    if moments.far():  # the first image was a poor guess (it differs from the rest): once more around the mean
        moments = _pass(x, moments.mean_guess())
    return moments.result()


def _pass(x: torch.Tensor, shift) -> ChannelMoments:
    moments = ChannelMoments(x.shape[1], x.dtype, shift)
    step = block_size(x)
    for start in range(0, x.shape[0], step):
        moments.add(x[start : start + step])
    return moments
