"""The `inspect` core: expand the inputs, load each checkpoint, find its BatchNorm layers, run the rules, build the report."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bncli.errors import InputError
from bncli.layers import find_layers, read_layer, select_layer
from bncli.loading import TORCH_SUFFIXES, load_checkpoint
from bncli.report import PROFILE_WIDTH, ChannelRow, FileReport, Finding, InspectReport, LayerReport, Summary
from bncli.rules import ALL_IDS, Thresholds, run_file_rules, run_rules

if TYPE_CHECKING:
    from bncli.layers import BNLayer

CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")


class NoInputFound(InputError):
    """A directory or a pattern on the command line that yields no checkpoint file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


def expand_inputs(args: list[str | os.PathLike]) -> list[str | NoInputFound]:
    """Files as given, directories walked (checkpoint suffixes only, hidden folders skipped), globs expanded.

    An argument that yields nothing becomes an InputError in its place, so that the others are still audited.
    Order is kept (directories and globs sorted) and duplicates are dropped.
    """
    out: list[str | NoInputFound] = []
    for arg in args:
        text = os.fspath(arg)
        if os.path.isdir(text):
            found = _walk(text)
            out.extend(found or [NoInputFound(text, f"no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) in this directory")])
        elif not os.path.lexists(text) and glob.has_magic(text):
            # The shell did not expand it (quoted, or no match there): expand it here, as CI configs often quote globs.
            matches = sorted(glob.glob(text, recursive=True))
            found = [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m])]
            out.extend(found or [NoInputFound(text, "no file matches this pattern")])
        else:
            out.append(text)
    seen: set[str] = set()
    unique: list[str | NoInputFound] = []
    for item in out:
        if isinstance(item, str):
            if item in seen:
                continue
            seen.add(item)
        unique.append(item)
    return unique


def _walk(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(CHECKPOINT_SUFFIXES))
    return found


def inspect_files(
    paths: list[str | os.PathLike | NoInputFound],
    *,
    layer: str | None = None,
    state: str | None = None,
    thresholds: Thresholds = Thresholds(),
    selected: frozenset[str] = ALL_IDS,
    require_bn: bool = False,
    strip_prefix: str | None = None,
) -> InspectReport:
    """Audit every input; an unreadable one becomes a FileReport with `error` set instead of stopping the rest."""
    files = []
    for p in paths:
        if isinstance(p, NoInputFound):
            files.append(FileReport.unreadable(p.path, p.message))
            continue
        try:
            files.append(
                inspect_file(
                    p,
                    layer=layer,
                    state=state,
                    thresholds=thresholds,
                    selected=selected,
                    require_bn=require_bn,
                    strip_prefix=strip_prefix,
                )
            )
        except InputError as exc:
            files.append(FileReport.unreadable(os.fspath(p), exc.message))
    return InspectReport(tuple(files))


def inspect_file(
    path: str | os.PathLike,
    *,
    layer: str | None = None,
    state: str | None = None,
    thresholds: Thresholds = Thresholds(),
    selected: frozenset[str] = ALL_IDS,
    require_bn: bool = False,
    strip_prefix: str | None = None,
) -> FileReport:
    """Audit one checkpoint; with `layer`, report only that layer, channel by channel."""
    ckpt = load_checkpoint(Path(path), state=state, strip_prefix=strip_prefix)
    keys = find_layers(ckpt)
    if layer is not None:
        keys = [select_layer(keys, layer, ckpt.provenance.path)]
    bns = [read_layer(ckpt, k) for k in keys]
    per_layer = [run_rules(bn, thresholds, selected) for bn in bns]
    # BN014 names a layer: its flags show it; BN012 is about the file's pickle
    across = run_file_rules(bns, thresholds, selected, require_bn, ckpt.provenance)
    layers = [
        summarize_layer(bn, found + [f for f in across if f.layer == bn.name], per_channel=layer is not None)
        for bn, found in zip(bns, per_layer, strict=True)
    ]
    findings = [f for found in per_layer for f in found] + across
    prov = ckpt.provenance
    return FileReport(
        prov.path, prov.format, prov.container, prov.prefix, tuple(layers), tuple(findings), alternatives=prov.alternatives
    )


def summarize_layer(bn: BNLayer, findings: list[Finding], per_channel: bool = False) -> LayerReport:
    import numpy as np

    weight_abs = None
    if bn.weight is not None and np.isfinite(bn.weight).any():
        weight_abs = float(np.abs(bn.weight[np.isfinite(bn.weight)]).min())
    channels = None
    if per_channel:
        channels = _channel_rows(bn, findings)
    return LayerReport(
        name=bn.name,
        num_features=bn.num_features,
        num_batches_tracked=bn.num_batches_tracked,
        dtype=bn.dtype,
        running_mean=_summary(bn.running_mean, np.mean),
        running_var=_summary(bn.running_var, np.median),
        weight_abs_min=weight_abs,
        flags=tuple(dict.fromkeys(f.name for f in findings)),
        channels=channels,
        running_var_profile=channel_profile(bn.running_var, log_scale=True),
        weight_abs_profile=None if bn.weight is None else channel_profile(np.abs(bn.weight)),
    )


def channel_profile(values, log_scale: bool = False, width: int = PROFILE_WIDTH) -> tuple[float, ...]:
    """At most `width` channels' values, for a sparkline: all of them, or for each of `width` equal buckets of
    channels the one farthest from the median (on a log scale for variances), or an invalid one (NaN, Inf, a
    variance <= 0) when the bucket has any, so that squeezing 2048 channels into 16 keeps an outlier visible."""
    import numpy as np

    values = values.astype(np.float64)
    n = values.size
    if n <= width:
        return tuple(float(v) for v in values)
    with np.errstate(divide="ignore", invalid="ignore"):
        points = np.where(values > 0, np.log10(values), np.nan) if log_scale else values.copy()
    points[~np.isfinite(points)] = np.nan
    finite = np.sort(points[np.isfinite(points)])
    median = finite[finite.size // 2] if finite.size else 0.0
    picked = []
    for i in range(width):
        lo, hi = i * n // width, (i + 1) * n // width
        bucket, raw = points[lo:hi], values[lo:hi]
        zero = (raw == 0) if log_scale else np.zeros(raw.shape, dtype=bool)
        invalid = np.isnan(bucket) & ~zero  # NaN, Inf, a negative variance: shown before an exact 0
        if invalid.any():
            at = int(np.argmax(invalid))
        elif zero.any():
            at = int(np.argmax(zero))
        else:
            at = int(np.argmax(np.abs(bucket - median)))
        picked.append(float(values[lo + at]))
    return tuple(picked)


def _summary(values, center) -> Summary:
    import numpy as np

    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0:
        return Summary(None, None, None)
    return Summary(float(finite.min()), float(center(finite)), float(finite.max()))


def _channel_rows(bn: BNLayer, findings: list[Finding]) -> tuple[ChannelRow, ...]:
    import numpy as np

    flags: dict[int, list[str]] = {}
    whole_layer = [f.name for f in findings if not f.channels]
    for f in findings:
        for c in f.channels:
            flags.setdefault(c, []).append(f.name)
    n = min(a.size for a in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if a is not None)
    with np.errstate(invalid="ignore"):
        std = np.sqrt(bn.running_var.astype(np.float64))
    rows = []
    for c in range(n):
        rows.append(
            ChannelRow(
                index=c,
                running_mean=float(bn.running_mean[c]),
                running_var=float(bn.running_var[c]),
                running_std=float(std[c]),
                weight=None if bn.weight is None else float(bn.weight[c]),
                bias=None if bn.bias is None else float(bn.bias[c]),
                flags=tuple(dict.fromkeys(whole_layer + flags.get(c, []))),
            )
        )
    return tuple(rows)
