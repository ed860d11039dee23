"""The `inspect` core: load a checkpoint, find its BatchNorm layers, run the rules, build the report."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from bncli.layers import find_layers, read_layer, select_layer
from bncli.loading import load_checkpoint
from bncli.report import ChannelRow, FileReport, Finding, InspectReport, LayerReport, Summary
from bncli.rules import Thresholds, run_rules

if TYPE_CHECKING:
    from bncli.layers import BNLayer


def inspect_files(
    paths: list[str | os.PathLike],
    *,
    layer: str | None = None,
    state: str | None = None,
    thresholds: Thresholds = Thresholds(),
    strip_prefix: str | None = None,
) -> InspectReport:
    return InspectReport(
        tuple(inspect_file(p, layer=layer, state=state, thresholds=thresholds, strip_prefix=strip_prefix) for p in paths)
    )


def inspect_file(
    path: str | os.PathLike,
    *,
    layer: str | None = None,
    state: str | None = None,
    thresholds: Thresholds = Thresholds(),
    strip_prefix: str | None = None,
) -> FileReport:
    """Audit one checkpoint; with `layer`, report only that layer, channel by channel."""
    ckpt = load_checkpoint(path, state=state, strip_prefix=strip_prefix)
    keys = find_layers(ckpt)
    if layer is not None:
        keys = [select_layer(keys, layer, ckpt.provenance.path)]
    layers, findings = [], []
    for k in keys:
        bn = read_layer(ckpt, k)
        found = run_rules(bn, thresholds)
        findings.extend(found)
        layers.append(summarize_layer(bn, found, per_channel=layer is not None))
    prov = ckpt.provenance
    return FileReport(prov.path, prov.format, prov.container, prov.prefix, tuple(layers), tuple(findings))


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
    )


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
