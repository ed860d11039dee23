"""Per-channel statistics of (N, C, H, W) tensors: float32 speed, float64 accuracy, small blocks of extra memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

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


def work_dtype(dtype):
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def first_image_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of x[0] in float64: the shift, a cheap guess of each channel's mean (0 where it is not
    finite: an Inf in the first image must not turn every deviation into Inf - Inf)."""
    import torch

    rows = x[:1].reshape(1, x.shape[1], -1)
    mean = rows[0].sum(-1, dtype=torch.float64) / max(1, rows.shape[2])  # float64: no overflow near 3e38
    return torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean))


class ChannelMoments:
    """Running sums of d = x - shift per channel, fed one block of images at a time.

    mean = shift + sum(d)/n and var = (sum(d^2) - sum(d)^2/n)/(n-1). Each (image, channel) row of H*W values is
    summed by torch in float32 (float64 for float64 input, or with wide=True), whose pairwise summation keeps
    the error near eps; rows are combined in float64. With the shift near the mean nothing cancels, so mean and
    std come out with an error around 1e-7 of the std or better. `far()` says when the shift turned out too far
    from the mean for that guarantee; the caller then repeats the pass around the found mean.

    The shift added back is the one the deviations were taken from (rounded to the working dtype), so a large
    offset adds no rounding error to the mean. A float32 block whose sums overflow (|x - shift| above ~1.8e19,
    or values near 3e38) is summed again in float64, and only that block: ordinary data keeps the float32 path.

    exact_mean=True also sums x itself in float64 (each value converted exactly), and the mean is that sum / n:
    accurate to about 1e-16 of max |x| rather than 1e-7 of the std. The train-mode batch mean needs it, since the
    running mean is 0.1 of it and a float32 ulp of a mean near 0 is far below 1e-7 of the std.
    """

    def __init__(self, channels: int, dtype, shift: torch.Tensor, exact_mean: bool = False) -> None:
        import torch

        self.exact_mean = exact_mean
        self.work = work_dtype(dtype)
        shift = shift.to(self.work)
        # finite, or every deviation of an Inf channel would be Inf - Inf; within the working dtype's range
        self.shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))[:, None]
        self.shift64 = self.shift[:, 0].double()  # exactly the shift the deviations are taken from
        self.s1 = torch.zeros(channels, dtype=torch.float64)
        self.s2 = torch.zeros(channels, dtype=torch.float64)
        self.raw = torch.zeros(channels, dtype=torch.float64)  # sum of x, with exact_mean
        self.count = 0
        self._own: list = [None]

    def add(self, block: torch.Tensor, scratch: list | None = None) -> None:
        """Accumulate one block; `scratch` (a one-item list) lets accumulators on one thread share a buffer."""
        import torch

        b, c = block.shape[0], block.shape[1]
        rows = block.reshape(b, c, -1)  # a view for NCHW-contiguous input, a block-sized copy otherwise
        if rows.shape[2] == 0:
            return
        holder = scratch if scratch is not None else self._own
        if self.exact_mean:
            self.raw += _sum64(rows, holder).view(b, c).sum(0)
        d = scratch_view(holder, (b, c, rows.shape[2]), self.work)
        torch.sub(rows, self.shift, out=d)
        r1 = d.sum(-1)
        d.square_()
        r2 = d.sum(-1)
        if self.work != torch.float64 and not bool(torch.isfinite(r2).all()):
            # float32 overflowed (or the block holds Inf/NaN, which float64 keeps as they are): this block in float64
            d64 = rows.double() - self.shift64[:, None]
            r1 = d64.sum(-1)
            r2 = d64.square_().sum(-1)
        self.s1 += r1.sum(0, dtype=torch.float64)
        self.s2 += r2.sum(0, dtype=torch.float64)
        self.count += b * rows.shape[2]

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        """Add another accumulator's sums (same shift) into this one."""
        self.s1 += other.s1
        self.s2 += other.s2
        self.raw += other.raw
        self.count += other.count
        return self

    def _offset_var(self):
        import torch

        offset = self.s1 / max(1, self.count)
        if self.count < 2:  # one value: the mean is defined, the corrected std is not (torch gives nan too)
            return offset, torch.full_like(offset, float("nan"))
        return offset, ((self.s2 - self.s1 * offset) / (self.count - 1)).clamp(min=0)

    def far(self) -> bool:
        """True when some channel's mean is far from the shift (measured in its stds): sum again around the mean."""
        if self.count < 2:
            return False
        offset, var = self._offset_var()
        return bool((offset.abs() > SHIFT_TOLERANCE * var.sqrt()).any())

    def mean_and_var(self):
        """float64 tensors: the mean and the unbiased variance."""
        offset, var = self._offset_var()
        if self.exact_mean:
            return self.raw / max(1, self.count), var
        return self.shift64 + offset, var

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        if self.count == 0:
            nan = np.full(self.s1.shape[0], np.nan)
            return nan, nan.copy()
        mean, var = self.mean_and_var()
        return mean.numpy(), var.sqrt().numpy()


def _sum64(rows: torch.Tensor, holder: list) -> torch.Tensor:
    """Sum of each (image, channel) row in float64, converting half of the rows at a time into the shared
    buffer (so the buffer needs no more bytes than the block has in float32)."""
    import torch

    flat = rows.reshape(-1, rows.shape[-1])
    sums = torch.empty(flat.shape[0], dtype=torch.float64)
    step = max(1, -(-flat.shape[0] * rows.element_size() // 8))
    for lo in range(0, flat.shape[0], step):
        hi = min(lo + step, flat.shape[0])
        t = scratch_view(holder, (hi - lo, flat.shape[1]), torch.float64)
        t.copy_(flat[lo:hi])
        torch.sum(t, -1, out=sums[lo:hi])
    return sums


def scratch_view(holder: list, shape: tuple[int, ...], dtype):
    """A tensor of `shape` and `dtype` on the bytes kept in holder[0], grown when too small: one buffer per
    thread serves every pass and dtype (freed and reallocated blocks would stay resident in malloc's arenas)."""
    import math

    import torch

    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    buf = holder[0]
    if buf is None or buf.numel() < nbytes:
        buf = holder[0] = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes].view(dtype).view(shape)


def run_blocks(n_img: int, step: int, body: Callable[[int, int, int], None]) -> int:
    """Call body(start, stop, worker) for every block of images; return the number of workers used.

    Blocks are split in contiguous runs over up to torch.get_num_threads() Python threads (torch releases the
    GIL), each running its ops with one intra-op thread. Many small parallel ops in a loop would otherwise pay
    an OpenMP barrier each, and on a busy machine every barrier waits for a descheduled thread.
    """
    import torch

    starts = list(range(0, n_img, step))
    workers = max(1, min(torch.get_num_threads(), len(starts)))
    if workers == 1:
        for s in starts:
            body(s, min(s + step, n_img), 0)
        return 1
    from concurrent.futures import ThreadPoolExecutor

    per = -(-len(starts) // workers)

    def run(worker: int) -> None:
        torch.set_num_threads(1)  # this thread's own setting: the caller's thread keeps its own
        for s in starts[worker * per : (worker + 1) * per]:
            body(s, min(s + step, n_img), worker)

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run, w) for w in range(workers)]:
            future.result()
    return workers


def moments_pass(x: torch.Tensor, shift: torch.Tensor, exact_mean: bool = False,
                 scratch: list | None = None) -> ChannelMoments:
    """One pass over x accumulating ChannelMoments around `shift`; `scratch`: one holder per worker thread, to
    reuse the buffers of another pass."""
    import torch

    workers = max(1, torch.get_num_threads())
    parts = [ChannelMoments(x.shape[1], x.dtype, shift, exact_mean) for _ in range(workers)]
    holders = scratch if scratch is not None else [[None] for _ in range(workers)]
    run_blocks(x.shape[0], block_size(x), lambda a, b, w: parts[w].add(x[a:b], holders[w]))
    for part in parts[1:]:
        parts[0].merge(part)
    return parts[0]


def settle(moments: ChannelMoments, x: torch.Tensor, scratch: list | None = None) -> ChannelMoments:
    """The moments, summed once more around the found mean when the shift was a poor guess (a drifting batch)."""
    if moments.far():
        return moments_pass(x, moments.mean_and_var()[0], moments.exact_mean, scratch)
    return moments


def channel_mean_std(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (correction=1, as torch.Tensor.std) of every channel over N, H and W, in float64."""
    if x.shape[0] == 0 or x.numel() == 0:
        return ChannelMoments(x.shape[1], x.dtype, _zeros(x.shape[1])).result()
    return settle(moments_pass(x, first_image_mean(x)), x).result()


def _zeros(channels: int):
    import torch

    return torch.zeros(channels, dtype=torch.float64)
