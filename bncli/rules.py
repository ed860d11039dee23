"""Audit rules: small pure functions from BatchNorm layers to findings, each with a stable id (documented in docs/rules.md)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bncli.errors import UsageError
from bncli.report import Finding, Severity

if TYPE_CHECKING:
    from bncli.layers import BNLayer

# Smallest positive normal number of each 16-bit float format: below it values are subnormal and lose precision.
SMALLEST_NORMAL = {"float16": 2.0**-14, "bfloat16": 2.0**-126}


@dataclass(frozen=True)
class Thresholds:
    """Every tunable number of the rules; CLI options and [tool.bncli] use the same names with dashes."""

    eps: float = 1e-5  # the layers' eps (not stored in a state dict): PyTorch's default
    min_var: float | None = None  # running_var below this is collapsed; None: use eps
    max_var: float = 1e4  # running_var above this (std 100) is exploding
    max_mean: float = 1e2  # |running_mean| above this is exploding
    dead_weight: float = 1e-3  # |gamma| below this: the channel outputs (almost) a constant

    @property
    def collapsed_below(self) -> float:
        return self.eps if self.min_var is None else self.min_var


Hits = list[tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    severity: Severity
    summary: str
    # (BNLayer, Thresholds) for layer rules, (list[BNLayer], Thresholds) for file rules, (Provenance,) for
    # source rules (what the file itself is, whatever its layers)
    check: Callable[..., Hits]
    thresholds: tuple[str, ...] = ()  # the Thresholds fields it uses, for the docs and --help
    scope: str = "layer"  # "layer", "file" or "source"


class RuleSelectionError(UsageError):
    """--select or --ignore (or the config file) names a rule that does not exist."""


def _channels(mask) -> tuple[int, ...]:
    import numpy as np

    return tuple(int(i) for i in np.flatnonzero(mask))


def _show(channels: tuple[int, ...], limit: int = 8) -> str:
    shown = ", ".join(str(c) for c in channels[:limit])
    return shown + (f", ... ({len(channels)} in all)" if len(channels) > limit else "")


def _is_default_stats(layer: BNLayer) -> bool:
    return bool((layer.running_mean == 0).all() and (layer.running_var == 1).all())


def check_shapes(layer: BNLayer, t: Thresholds) -> Hits:
    sizes = {"running_mean": layer.running_mean.size, "running_var": layer.running_var.size}
    for field in ("weight", "bias"):
        if getattr(layer, field) is not None:
            sizes[field] = getattr(layer, field).size
    if len(set(sizes.values())) > 1:
        return [((), "lengths differ: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))]
    if layer.running_var.size == 0:
        return [((), "the layer has 0 channels")]
    return []


def check_non_finite(layer: BNLayer, t: Thresholds) -> Hits:
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


def check_negative_var(layer: BNLayer, t: Thresholds) -> Hits:
    bad = _channels(layer.running_var < 0)
    return [(bad, f"running_var is negative in channel(s) {_show(bad)}, which no variance can be: the statistics are corrupt")] if bad else []


def check_never_updated(layer: BNLayer, t: Thresholds) -> Hits:
    if _is_default_stats(layer):
        return [
            (
                (),
                "every running_mean is 0 and every running_var is 1: the statistics were never updated "
                "(trained in eval mode, frozen, or saved before any forward pass)",
            )
        ]
    return []


def check_collapsed_var(layer: BNLayer, t: Thresholds) -> Hits:
    import numpy as np

    var = layer.running_var.astype(np.float64)
    bad = _channels(np.isfinite(var) & (var >= 0) & (var < t.collapsed_below))
    if not bad:
        return []
    worst = min(bad, key=lambda c: var[c])
    scale = 1.0 / float(np.sqrt(var[worst] + t.eps))
    return [
        (
            bad,
            f"running_var below {t.collapsed_below:g} in channel(s) {_show(bad)}: the normalization scale "
            f"1/sqrt(running_var + eps) reaches {scale:.4g} (channel {worst}, eps={t.eps:g})",
        )
    ]


def check_dead_channels(layer: BNLayer, t: Thresholds) -> Hits:
    import numpy as np

    if layer.weight is None:
        return []
    bad = _channels(np.isfinite(layer.weight) & (np.abs(layer.weight) < t.dead_weight))
    if not bad:
        return []
    return [(bad, f"|weight| below {t.dead_weight:g} in {len(bad)} channel(s) ({_show(bad)}): they output a constant")]


def check_converted(layer: BNLayer, t: Thresholds) -> Hits:
    if layer.num_batches_tracked == 0 and not _is_default_stats(layer):
        return [
            (
                (),
                "num_batches_tracked is 0 but the statistics are not the defaults: probably converted from another "
                "framework (Keras, ONNX, JAX) or edited by hand; check that eps and momentum were carried over",
            )
        ]
    return []


def check_exploding(layer: BNLayer, t: Thresholds) -> Hits:
    import numpy as np

    out = []
    var = layer.running_var.astype(np.float64)
    big = _channels(np.isfinite(var) & (var > t.max_var))
    if big:
        out.append((big, f"running_var above {t.max_var:g} in channel(s) {_show(big)} (max {var[list(big)].max():.4g})"))
    mean = layer.running_mean.astype(np.float64)
    big = _channels(np.isfinite(mean) & (np.abs(mean) > t.max_mean))
    if big:
        top = np.abs(mean[list(big)]).max()
        out.append((big, f"|running_mean| above {t.max_mean:g} in channel(s) {_show(big)} (max {top:.4g})"))
    return out


def check_low_precision(layer: BNLayer, t: Thresholds) -> Hits:
    import numpy as np

    tiny = SMALLEST_NORMAL.get(layer.dtype)
    if tiny is None:
        return []
    out = []
    for field in ("running_mean", "running_var"):
        values = np.abs(getattr(layer, field).astype(np.float64))
        bad = _channels((values > 0) & (values < tiny))
        if bad:
            out.append(
                (
                    bad,
                    f"{field} is stored as {layer.dtype} and is below its smallest normal number {tiny:.4g} in channel(s) "
                    f"{_show(bad)}: those values are subnormal and have lost precision",
                )
            )
    return out


def check_untrained_affine(layer: BNLayer, t: Thresholds) -> Hits:
    if layer.weight is None or layer.bias is None or layer.weight.size == 0:
        return []
    if (layer.weight == 1).all() and (layer.bias == 0).all() and not _is_default_stats(layer):
        return [((), "weight is exactly 1 and bias exactly 0 everywhere while the statistics are trained: the affine "
                     "parameters were never trained (frozen, not in the optimizer, or not loaded)")]
    return []


def check_no_batchnorm(layers: list[BNLayer], t: Thresholds) -> Hits:
    if layers:
        return []
    return [((), "no BatchNorm layer in the file (no key prefix has both running_mean and running_var)")]


# Globals whose call is code execution by itself (not a class being rebuilt): named as calls in BN012.
DANGEROUS_CALLS = frozenset(
    "posix.system nt.system os.system os.popen os.execv os.execve os.spawnv os.fork subprocess.call subprocess.Popen "
    "subprocess.run subprocess.check_call subprocess.check_output subprocess.getoutput builtins.eval builtins.exec "
    "builtins.compile builtins.__import__ builtins.getattr builtins.setattr builtins.open builtins.breakpoint "
    "importlib.import_module runpy.run_path runpy.run_module pty.spawn webbrowser.open shutil.rmtree "
    "socket.socket pickle.loads _pickle.loads marshal.loads types.FunctionType types.CodeType".split()
)


def check_pickled_code(prov) -> Hits:
    names = list(getattr(prov, "pickled_globals", ()))
    if not names:
        return []
    calls = [g for g in prov.pickled_calls if g in DANGEROUS_CALLS]
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    what = f"would import {len(names)} global{'s' if len(names) != 1 else ''} ({shown})"
    if calls:
        what += f" and call {', '.join(calls)}, which runs code by itself"
    return [((), f"only torch.load(weights_only=False) can load this file, which {what}; bncli read it as data "
                 "and imported nothing")]


# Shape comes first: when lengths differ the per-channel rules cannot line channels up and are skipped.
RULES: tuple[Rule, ...] = (
    Rule("BN006", "shape-mismatch", Severity.ERROR, "running_mean, running_var, weight and bias lengths differ", check_shapes),
    Rule("BN001", "non-finite", Severity.ERROR, "NaN or Inf in statistics or affine parameters", check_non_finite),
    Rule("BN002", "negative-variance", Severity.ERROR, "running_var below zero", check_negative_var),
    Rule("BN003", "never-updated", Severity.ERROR, "running_mean all 0 and running_var all 1", check_never_updated),
    Rule("BN004", "collapsed-variance", Severity.WARNING, "running_var below a threshold (default eps)", check_collapsed_var,
         ("eps", "min_var")),
    Rule("BN005", "dead-channel", Severity.INFO, "|weight| below a threshold", check_dead_channels, ("dead_weight",)),
    Rule("BN007", "converted-statistics", Severity.INFO, "num_batches_tracked is 0 but the statistics are not the defaults",
         check_converted),
    Rule("BN008", "exploding-statistics", Severity.WARNING, "running_var or |running_mean| above a threshold", check_exploding,
         ("max_var", "max_mean")),
    Rule("BN009", "low-precision-statistics", Severity.WARNING, "float16/bfloat16 statistics below the format's normal range",
         check_low_precision),
    Rule("BN010", "untrained-affine", Severity.INFO, "weight all 1 and bias all 0 while the statistics are trained",
         check_untrained_affine),
    Rule("BN012", "pickled-code", Severity.WARNING, "loading the file needs torch.load(weights_only=False), which imports "
         "and calls what the pickle names", check_pickled_code, scope="source"),
    Rule("BN011", "no-batchnorm", Severity.INFO, "no BatchNorm layer in the file (error with --require-bn)", check_no_batchnorm,
         scope="file"),
)
ALL_IDS = frozenset(r.id for r in RULES)


def rule_by_key(key: str) -> Rule:
    """A rule by its id (any case) or its name; an unknown key is a usage error that suggests the nearest."""
    wanted = key.strip()
    for rule in RULES:
        if wanted.upper() == rule.id or wanted.lower() == rule.name:
            return rule
    keys = [r.id for r in RULES] + [r.name for r in RULES]
    near = difflib.get_close_matches(wanted, keys, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; known rules: {', '.join(r.id for r in RULES)}"
    raise RuleSelectionError(f"unknown rule {key!r}{hint}")


def _split(keys: Iterable[str] | None) -> list[str]:
    return [part for key in keys or () for part in key.split(",") if part.strip()]


def select_rules(select: Iterable[str] | None = None, ignore: Iterable[str] | None = None) -> frozenset[str]:
    """The ids left after --select (default: all) and --ignore; each accepts ids or names, repeated or comma-separated."""
    chosen = {rule_by_key(k).id for k in _split(select)} if _split(select) else set(ALL_IDS)
    left = frozenset(chosen - {rule_by_key(k).id for k in _split(ignore)})
    if not left:  # a gate that can never fail is a mistake, not a setting
        raise UsageError("--select and --ignore leave no rule to run")
    return left


def run_rules(layer: BNLayer, thresholds: Thresholds = Thresholds(), selected: frozenset[str] = ALL_IDS) -> list[Finding]:
    """Every finding for one layer, in rule order; rules outside `selected` are not reported."""
    findings = []
    for rule in RULES:
        if rule.scope != "layer":
            continue
        hits = rule.check(layer, thresholds)
        if rule.id in selected:
            findings.extend(Finding(rule.id, rule.name, rule.severity, layer.name, ch, msg) for ch, msg in hits)
        if rule.id == "BN006" and hits:
            break  # even when BN006 is ignored: the other rules assume one length
    return findings


def run_file_rules(
    layers: list[BNLayer],
    thresholds: Thresholds = Thresholds(),
    selected: frozenset[str] = ALL_IDS,
    require_bn: bool = False,
    provenance=None,
) -> list[Finding]:
    """Findings about the file as a whole (layer None); --require-bn raises BN011 to an error. Source rules
    (BN012) run when the file's provenance is given."""
    findings = []
    for rule in RULES:
        if rule.scope == "layer" or rule.id not in selected:
            continue
        if rule.scope == "source":
            hits = rule.check(provenance) if provenance is not None else []
        else:
            hits = rule.check(layers, thresholds)
        severity = Severity.ERROR if rule.id == "BN011" and require_bn else rule.severity
        findings.extend(Finding(rule.id, rule.name, severity, None, ch, msg) for ch, msg in hits)
    return findings
