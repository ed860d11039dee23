"""The `diff` core: compare the BatchNorm layers of two checkpoints, layer by layer and channel by channel."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bncli.errors import InputError, UsageError

if TYPE_CHECKING:
    from bncli.layers import BNLayer

IDENTICAL = "identical"
CHANGED = "changed"
SHAPE_CHANGED = "shape-changed"
FAIL_ON_CHANGE = "fail-on-change"
FAIL_IF_UNCHANGED = "fail-if-unchanged"


@dataclass(frozen=True)
class ChannelDiff:
    """One channel in A and B; shift = |mean_B - mean_A| / sqrt(var_A + eps), kl = symmetric KL (Jeffreys)."""

    index: int
    mean_a: float
    mean_b: float
    var_a: float
    var_b: float
    shift: float
    var_ratio: float  # var_B / var_A; 1 for equal variances, NaN for a NaN or negative one
    kl: float
    weight_change: float | None  # weight_B - weight_A; None when a side has no weight
    bias_change: float | None
    changed: bool


@dataclass(frozen=True)
class LayerDiff:
    """One layer present in both files; the statistics are None for a shape-changed layer."""

    name: str
    verdict: str  # identical | changed | shape-changed
    num_features_a: int
    num_features_b: int
    changed_channels: tuple[int, ...]
    max_shift: float | None
    var_ratio_min: float | None  # over the channels where both variances are positive (NaN: a broken channel)
    var_ratio_max: float | None
    mean_kl: float | None
    batches_a: int | None
    batches_b: int | None
    weight_max_change: float | None  # max |weight_B - weight_A|
    bias_max_change: float | None
    channels: tuple[ChannelDiff, ...] | None = None  # filled only for --layer
    zero_var_channels: int | None = None  # channels whose running_var is 0 in A or in B; None when shape-changed

    @property
    def batches_change(self) -> int | None:
        if self.batches_a is None or self.batches_b is None:
            return None
        return self.batches_b - self.batches_a


@dataclass(frozen=True)
class DiffReport:
    path_a: str
    path_b: str
    eps: float
    layers: tuple[LayerDiff, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    prefix_a: str | None = None
    prefix_b: str | None = None
    atol: float = 0.0  # |B - A| <= atol + rtol * |A| counts as equal (0, 0: every value exactly equal)
    rtol: float = 0.0
    gate: str | None = None  # FAIL_ON_CHANGE, FAIL_IF_UNCHANGED or None: the expectation the exit status checks
    container_a: str | None = None  # where each state dict was found in its file, e.g. "model_ema"
    container_b: str | None = None
    state_a: str | None = None  # the --state/--state-a/--state-b key asked for, shown in the title
    state_b: str | None = None

    @property
    def violations(self) -> tuple[str, ...]:
        """The layers that violate the gate: changed ones for fail-on-change, identical ones for fail-if-unchanged."""
        if self.gate == FAIL_ON_CHANGE:
            return self.changed
        if self.gate == FAIL_IF_UNCHANGED:
            return self.unchanged
        return ()

    @property
    def failed(self) -> bool:
        """Whether the gate is violated; fail-if-unchanged also fails when no layer is in both files."""
        if self.gate == FAIL_IF_UNCHANGED and not self.layers:
            return True
        return bool(self.violations)

    @property
    def changed(self) -> tuple[str, ...]:
        """Names of the layers that differ in any way, including those present on one side only."""
        return tuple(x.name for x in self.layers if x.verdict != IDENTICAL) + self.only_a + self.only_b

    @property
    def batches_common(self) -> int | None:
        """The most common change of num_batches_tracked among the layers (a tie: the smaller change)."""
        changes = [x.batches_change for x in self.layers if x.batches_change is not None]
        if not changes:
            return None
        return max(dict.fromkeys(changes), key=lambda c: (changes.count(c), -abs(c)))

    @property
    def uneven_batches(self) -> tuple[tuple[str, int], ...]:
        """(layer, change) for the layers whose num_batches_tracked changed by another amount than most layers':
        a block updated twice per step (activation checkpointing), a frozen one, one loaded from elsewhere."""
        common = self.batches_common
        return tuple(
            (x.name, x.batches_change) for x in self.layers if x.batches_change is not None and x.batches_change != common
        )

    @property
    def unchanged(self) -> tuple[str, ...]:
        return tuple(x.name for x in self.layers if x.verdict == IDENTICAL)

    def to_json(self) -> str:
        """Exactly what `bncli diff --format json` prints for this report."""
        from bncli.render.diff import diff_json

        return diff_json(self)


def check_tolerances(atol: float, rtol: float) -> None:
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if not (value >= 0 and value != float("inf")):  # NaN fails the first test
            raise UsageError(f"{name} must be a finite number >= 0; got {value:g}")


def layer_filter(only: Iterable[str] = (), exclude: Iterable[str] = ()):
    """A predicate on layer names: matches one of `only` (when given) and none of `exclude` (fnmatch globs,
    case-sensitive; `*` also matches dots, so 'backbone.*' is every layer under backbone)."""
    only, exclude = tuple(only or ()), tuple(exclude or ())

    def keep(name: str) -> bool:
        if only and not any(fnmatch.fnmatchcase(name, pattern) for pattern in only):
            return False
        return not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)

    return keep


def _check_patterns(option: str, patterns: Iterable[str], names: list[str], where: str) -> None:
    """A pattern that matches no layer at all is a typo that would make a gate pass silently: an input error."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise InputError(f"{option} {pattern!r} matches no BatchNorm layer of {where}" + (f"; layers: {shown}" if names else ""))


def diff_files(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    *,
    layer: str | None = None,
    eps: float = 1e-5,
    state: str | None = None,
    strip_prefix_a: str | None = None,
    strip_prefix_b: str | None = None,
    state_a: str | None = None,
    state_b: str | None = None,
    only: Iterable[str] = (),
    exclude: Iterable[str] = (),
    atol: float = 0.0,
    rtol: float = 0.0,
    gate: str | None = None,
) -> DiffReport:
    """Load both checkpoints and compare their BatchNorm layers, matched by name after prefix stripping
    (the wrapper prefixes always, and strip_prefix_a/_b, as load_checkpoint's strip_prefix, when given).

    `state` picks the state dict of both files, `state_a`/`state_b` of one (the model and its EMA in one file);
    `only`/`exclude` keep the layers whose names match the globs; values within atol + rtol * |A| are equal."""
    from bncli.layers import find_layers, read_layer, select_layer
    from bncli.loading import load_checkpoint

    check_tolerances(atol, rtol)
    if gate not in (None, FAIL_ON_CHANGE, FAIL_IF_UNCHANGED):
        raise UsageError(f"unknown gate {gate!r}; use {FAIL_ON_CHANGE!r} or {FAIL_IF_UNCHANGED!r}")
    if state is not None and (state_a is not None or state_b is not None):
        raise UsageError("--state applies to both files: use it without --state-a/--state-b")
    if layer is not None and (only or exclude):
        raise UsageError("--layer picks one layer: use it without --only/--exclude")
    state_a = state if state_a is None else state_a
    state_b = state if state_b is None else state_b
    ckpt_a = load_checkpoint(path_a, state=state_a, strip_prefix=strip_prefix_a)
    ckpt_b = load_checkpoint(path_b, state=state_b, strip_prefix=strip_prefix_b)
    keys_a, keys_b = find_layers(ckpt_a), find_layers(ckpt_b)
    if only or exclude:
        names = list(dict.fromkeys([k.name for k in keys_a] + [k.name for k in keys_b]))
        _check_patterns("--only", only, names, "A or B")
        _check_patterns("--exclude", exclude, names, "A or B")
        keep = layer_filter(only, exclude)
        keys_a, keys_b = [k for k in keys_a if keep(k.name)], [k for k in keys_b if keep(k.name)]
    if layer is not None:
        picked = select_layer(keys_a, layer, ckpt_a.provenance.path, ckpt_a.provenance.prefix)
        if picked.name not in {k.name for k in keys_b}:
            select_layer(keys_b, picked.name, ckpt_b.provenance.path, ckpt_b.provenance.prefix)  # raises: nearest in B
        keys_a = [picked]
        keys_b = [k for k in keys_b if k.name == picked.name]
    layers_a = [read_layer(ckpt_a, k) for k in keys_a]
    layers_b = [read_layer(ckpt_b, k) for k in keys_b]
    return diff_layers(
        layers_a,
        layers_b,
        path_a=ckpt_a.provenance.path,
        path_b=ckpt_b.provenance.path,
        eps=eps,
        per_channel=layer is not None,
        prefix_a=ckpt_a.provenance.prefix,
        prefix_b=ckpt_b.provenance.prefix,
        atol=atol,
        rtol=rtol,
        gate=gate,
        container_a=ckpt_a.provenance.container,
        container_b=ckpt_b.provenance.container,
        state_a=state_a,
        state_b=state_b,
    )


def diff_layers(
    layers_a: list[BNLayer],
    layers_b: list[BNLayer],
    *,
    path_a: str,
    path_b: str,
    eps: float = 1e-5,
    per_channel: bool = False,
    prefix_a: str | None = None,
    prefix_b: str | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    **report,
) -> DiffReport:
    """Compare two lists of layers; common layers in A's order, then the names found on one side only.
    `report` holds DiffReport's descriptive fields (gate, containers, states)."""
    check_tolerances(atol, rtol)
    by_name_b = {x.name: x for x in layers_b}
    names_a = {x.name for x in layers_a}
    common = [compare_layer(a, by_name_b[a.name], eps, per_channel, atol, rtol) for a in layers_a if a.name in by_name_b]
    return DiffReport(
        path_a=path_a,
        path_b=path_b,
        eps=eps,
        layers=tuple(common),
        only_a=tuple(x.name for x in layers_a if x.name not in by_name_b),
        only_b=tuple(x.name for x in layers_b if x.name not in names_a),
        prefix_a=prefix_a,
        prefix_b=prefix_b,
        atol=atol,
        rtol=rtol,
        **report,
    )


def compare_layer(
    a: BNLayer, b: BNLayer, eps: float, per_channel: bool = False, atol: float = 0.0, rtol: float = 0.0
) -> LayerDiff:
    """All statistics in float64, whatever the stored dtype; a value within atol + rtol * |A| of A's is unchanged."""
    import numpy as np

    base = {
        "name": a.name,
        "num_features_a": a.num_features,
        "num_features_b": b.num_features,
        "batches_a": a.num_batches_tracked,
        "batches_b": b.num_batches_tracked,
    }
    shapes_differ = (
        a.running_mean.shape != b.running_mean.shape
        or a.running_var.shape != b.running_var.shape
        or _shape(a.weight) != _shape(b.weight)
        or _shape(a.bias) != _shape(b.bias)
    )
    if shapes_differ:
        return LayerDiff(
            verdict=SHAPE_CHANGED,
            changed_channels=(),
            max_shift=None,
            var_ratio_min=None,
            var_ratio_max=None,
            mean_kl=None,
            weight_max_change=None,
            bias_max_change=None,
            **base,
        )
    f64 = np.float64
    ma, mb = a.running_mean.astype(f64), b.running_mean.astype(f64)
    va, vb = a.running_var.astype(f64), b.running_var.astype(f64)
    with np.errstate(all="ignore"):
        shift, ratio, kl = channel_metrics(ma, va, mb, vb, eps)
        dw = _delta(a.weight, b.weight)
        db = _delta(a.bias, b.bias)
        changed = ~(_same(ma, mb, atol, rtol) & _same(va, vb, atol, rtol))
        if dw is not None:
            changed |= ~_same(a.weight.astype(f64), b.weight.astype(f64), atol, rtol)
        if db is not None:
            changed |= ~_same(a.bias.astype(f64), b.bias.astype(f64), atol, rtol)
    positive = (va > 0) & (vb > 0)
    broken = _broken(va) | _broken(vb)
    # Values, not dtypes: a lossless cast is not an update of the statistics.
    identical = not changed.any() and a.num_batches_tracked == b.num_batches_tracked
    channels = None
    if per_channel:
        channels = tuple(
            ChannelDiff(
                index=i,
                mean_a=float(ma[i]),
                mean_b=float(mb[i]),
                var_a=float(va[i]),
                var_b=float(vb[i]),
                shift=float(shift[i]),
                var_ratio=float(ratio[i]),
                kl=float(kl[i]),
                weight_change=None if dw is None else float(dw[i]),
                bias_change=None if db is None else float(db[i]),
                changed=bool(changed[i]),
            )
            for i in range(a.num_features)
        )
    return LayerDiff(
        verdict=IDENTICAL if identical else CHANGED,
        changed_channels=tuple(int(i) for i in np.flatnonzero(changed)),
        max_shift=_reduce(shift, np.max),
        # The range over the channels where both variances are positive: a zero variance (a dead or pruned
        # channel) has no ratio worth a range and is counted instead; a NaN or negative one still shows as NaN.
        var_ratio_min=_reduce(np.where(broken, np.nan, ratio)[positive | broken], np.min),
        var_ratio_max=_reduce(np.where(broken, np.nan, ratio)[positive | broken], np.max),
        zero_var_channels=int(np.count_nonzero((va == 0) | (vb == 0))),
        mean_kl=_reduce(kl, np.mean),
        weight_max_change=None if dw is None else _reduce(np.abs(dw), np.max),
        bias_max_change=None if db is None else _reduce(np.abs(db), np.max),
        channels=channels,
        **base,
    )


def channel_metrics(ma, va, mb, vb, eps: float):
    """Per channel (float64 arrays): the mean shift, the variance ratio and the symmetric KL.

    A NaN or negative variance is no variance at all: every metric that uses it is NaN. Equal values are never
    NaN: equal means shift 0, equal variances (0 and Inf included) have ratio 1, equal (mean, variance) have KL 0.
    A zero variance has ratio 0 or Inf against a positive one, and the KL of N(mean, eps); with eps 0 it is a point
    mass, whose KL against anything else is Inf.
    """
    import numpy as np

    bad_a, bad_b = _broken(va), _broken(vb)
    same_mean = ma == mb
    shift = np.where(same_mean, 0.0, np.abs(mb - ma) / np.sqrt(va + eps))
    shift = np.where(bad_a | np.isnan(ma) | np.isnan(mb), np.nan, shift)
    ratio = np.where(va == vb, 1.0, vb / va)
    ratio = np.where(bad_a | bad_b, np.nan, ratio)
    kl = symmetric_kl(ma, va + eps, mb, vb + eps)
    kl = np.where(same_mean & (va == vb), 0.0, kl)
    kl = np.where(bad_a | bad_b, np.nan, kl)
    return shift, ratio, kl


def _broken(var):
    import numpy as np

    return np.isnan(var) | (var < 0)


def symmetric_kl(mean_a, var_a, mean_b, var_b):
    """KL(A||B) + KL(B||A) between N(mean_a, var_a) and N(mean_b, var_b), elementwise; the log terms cancel.
    A variance of 0 is a point mass: Inf against any other distribution; a negative one is NaN."""
    import numpy as np

    d2 = (mean_a - mean_b) ** 2
    kl = 0.5 * (var_a / var_b + var_b / var_a - 2.0) + 0.5 * d2 * (1.0 / var_a + 1.0 / var_b)
    kl = np.where((var_a == 0) | (var_b == 0), np.inf, kl)
    return np.where((var_a < 0) | (var_b < 0), np.nan, kl)  # no Gaussian has a negative variance


def _same(x, y, atol: float = 0.0, rtol: float = 0.0):
    """Elementwise equality where NaN equals NaN (an unchanged NaN is not a change), within atol + rtol * |x|."""
    import numpy as np

    same = (x == y) | (np.isnan(x) & np.isnan(y))
    if atol or rtol:
        same |= np.abs(y - x) <= atol + rtol * np.abs(x)  # NaN and Inf - Inf compare False: still changed
    return same


def _delta(a, b):
    import numpy as np

    if a is None or b is None:
        return None
    return b.astype(np.float64) - a.astype(np.float64)


def _shape(x) -> tuple[int, ...] | None:
    return None if x is None else tuple(x.shape)


def _reduce(values, fn) -> float | None:
    """fn over the values; NaN if any is NaN (a broken channel must not hide), None for an empty layer."""
    import numpy as np

    if values.size == 0:
        return None
    if np.isnan(values).any():
        return float("nan")
    return float(fn(values))



from bncli.api import callable_module  # noqa: E402 - last: the module is complete before it becomes callable

callable_module(__name__, "diff")
