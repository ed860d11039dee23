"""Audit rules: small pure functions from one BatchNorm layer to findings, each with a stable id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bncli.report import Finding, Severity

if TYPE_CHECKING:
    from bncli.layers import BNLayer


@dataclass(frozen=True)
class Thresholds:
    eps: float = 1e-5  # running_var below this makes 1/sqrt(var + eps) explode (PyTorch's default eps)
    dead_weight: float = 1e-3  # |gamma| below this: the channel outputs (almost) a constant


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    severity: Severity
    summary: str
    check: Callable[[BNLayer, Thresholds], list[tuple[tuple[int, ...], str]]]


def _channels(mask) -> tuple[int, ...]:
    import numpy as np

    return tuple(int(i) for i in np.flatnonzero(mask))


def _show(channels: tuple[int, ...], limit: int = 8) -> str:
    shown = ", ".join(str(c) for c in channels[:limit])
    return shown + (f", ... ({len(channels)} in all)" if len(channels) > limit else "")


def check_shapes(layer: BNLayer, t: Thresholds) -> list[tuple[tuple[int, ...], str]]:
    sizes = {"running_mean": layer.running_mean.size, "running_var": layer.running_var.size}
    for field in ("weight", "bias"):
        if getattr(layer, field) is not None:
            sizes[field] = getattr(layer, field).size
    if len(set(sizes.values())) > 1:
        return [((), "lengths differ: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))]
    if layer.running_var.size == 0:
        return [((), "the layer has 0 channels")]
    return []


def check_non_finite(layer: BNLayer, t: Thresholds) -> list[tuple[tuple[int, ...], str]]:
    import numpy as np

    out = []
    for field in ("running_mean", "running_var", "weight", "bias"):
        values = getattr(layer, field)
        if values is None:
            continue
        bad = _channels(~np.isfinite(values))
        if bad:
            kinds = sorted({"NaN" if np.isnan(values[c]) else "Inf" for c in bad})
            out.append((bad, f"{field} is {'/'.join(kinds)} in channel(s) {_show(bad)}"))
    return out


def check_negative_var(layer: BNLayer, t: Thresholds) -> list[tuple[tuple[int, ...], str]]:
    bad = _channels(layer.running_var < 0)
    return [(bad, f"running_var is negative in channel(s) {_show(bad)}; a variance cannot be")] if bad else []


def check_never_updated(layer: BNLayer, t: Thresholds) -> list[tuple[tuple[int, ...], str]]:
    if (layer.running_mean == 0).all() and (layer.running_var == 1).all():
        return [
            (
                (),
                "every running_mean is 0 and every running_var is 1: the statistics were never updated "
                "(trained in eval mode, frozen, or saved before any forward pass)",
            )
        ]
    return []


def check_collapsed_var(layer: BNLayer, t: Thresholds) -> list[tuple[tuple[int, ...], str]]:
    import numpy as np

    var = layer.running_var
    bad = _channels(np.isfinite(var) & (var >= 0) & (var < t.eps))
    if not bad:
        return []
    scale = 1.0 / float(np.sqrt(var[list(bad)].min() + t.eps))
    return [(bad, f"running_var below eps={t.eps:g} in channel(s) {_show(bad)}; normalization scales inputs by up to {scale:.3g}")]


def check_dead_channels(layer: BNLayer, t: Thresholds) -> list[tuple[tuple[int, ...], str]]:
    import numpy as np

    if layer.weight is None:
        return []
    bad = _channels(np.isfinite(layer.weight) & (np.abs(layer.weight) < t.dead_weight))
    if not bad:
        return []
    return [(bad, f"|weight| below {t.dead_weight:g} in {len(bad)} channel(s) ({_show(bad)}): they output a constant")]


# Shape comes first: when lengths differ the per-channel rules cannot line channels up and are skipped.
RULES: tuple[Rule, ...] = (
    Rule("BN006", "shape-mismatch", Severity.ERROR, "running_mean, running_var, weight and bias lengths differ", check_shapes),
    Rule("BN001", "non-finite", Severity.ERROR, "NaN or Inf in statistics or affine parameters", check_non_finite),
    Rule("BN002", "negative-variance", Severity.ERROR, "running_var below zero", check_negative_var),
    Rule("BN003", "never-updated", Severity.ERROR, "running_mean all 0 and running_var all 1", check_never_updated),
    Rule("BN004", "collapsed-variance", Severity.WARNING, "running_var below eps", check_collapsed_var),
    Rule("BN005", "dead-channel", Severity.INFO, "|weight| below a threshold", check_dead_channels),
)


def run_rules(layer: BNLayer, thresholds: Thresholds = Thresholds()) -> list[Finding]:
    """Every finding for one layer, in rule order."""
    findings = []
    for rule in RULES:
        for channels, message in rule.check(layer, thresholds):
            findings.append(Finding(rule.id, rule.name, rule.severity, layer.name, channels, message))
        if rule.id == "BN006" and findings:
            break
    return findings
