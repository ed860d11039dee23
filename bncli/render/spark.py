"""Per-channel sparklines in unicode block characters, pure Python: outlier channels stand out at a glance."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

BLOCKS = "▁▂▃▄▅▆▇█"
INVALID = "×"  # NaN, Inf, or a value the transform cannot take (log10 of a negative variance)
ZERO = "○"  # a variance of exactly 0 (a pruned or constant channel): not corrupt, so not ×
WIDTH = 16


def log10_or_nan(value: float) -> float:
    return math.log10(value) if math.isfinite(value) and value > 0 else math.nan


def sparkline(values: Sequence[float], transform: Callable[[float], float] = float, width: int = WIDTH,
              zero_mark: bool = False) -> str:
    """One character per channel, or per bucket of channels when there are more than `width`.

    A bucket shows its most extreme channel (farthest from the layer's median), so that squeezing
    2048 channels into 16 characters keeps an outlier visible instead of averaging it away.
    """
    if not values:
        return ""
    points = [transform(v) if math.isfinite(v) else math.nan for v in values]
    zeros = [zero_mark and v == 0 for v in values]
    finite = sorted(p for p in points if math.isfinite(p))
    median = finite[len(finite) // 2] if finite else 0.0
    low, high = (finite[0], finite[-1]) if finite else (0.0, 0.0)
    chars = []
    for bucket, zero in zip(_buckets(points, width), _buckets(zeros, width), strict=True):
        if any(not math.isfinite(p) and not z for p, z in zip(bucket, zero, strict=True)):
            chars.append(INVALID)
            continue
        if any(zero):
            chars.append(ZERO)
            continue
        extreme = max(bucket, key=lambda p: abs(p - median))
        chars.append(_block(extreme, low, high))
    return "".join(chars)


def _buckets(points: list, width: int) -> list[list]:
    n = len(points)
    if n <= width:
        return [[p] for p in points]
    return [points[i * n // width : (i + 1) * n // width] for i in range(width)]


def _block(value: float, low: float, high: float) -> str:
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return BLOCKS[3]  # all equal: a flat line in the middle
    level = int((value - low) / (high - low) * (len(BLOCKS) - 1) + 0.5)
    return BLOCKS[max(0, min(len(BLOCKS) - 1, level))]


def var_spark(values: Sequence[float], width: int = WIDTH) -> str:
    return sparkline(values, log10_or_nan, width, zero_mark=True)


def weight_spark(values: Sequence[float] | None, width: int = WIDTH) -> str:
    return "" if values is None else sparkline(values, float, width)
