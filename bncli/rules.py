"""The rule catalogue: small pure functions from BatchNorm layers to findings, each registered with its id and its documentation."""

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
    max_fold_spread: float = 1e2  # largest folded scale |gamma|/sqrt(var + eps) above this many times the median

    @property
    def collapsed_below(self) -> float:
        return self.eps if self.min_var is None else self.min_var


Hits = list[tuple[tuple[int, ...], str]]
# File rules may name the layer a finding is about: (layer name or None, channels, message), and may give a hit a
# severity of its own as a fourth element (BN016: info for a ratio that every layer shares).
FileHits = list[tuple]

FLOAT16_MAX = 65504.0  # the largest finite float16: a folded weight beyond it overflows a half-precision export


# Where the catalogue is published (the README's repository address, a placeholder until bncli is published).
DOCS_URL = "https://github.com/bncli/bncli/blob/main/docs/rules.md"


@dataclass(frozen=True)
class Rule:
    """One entry of the catalogue: the check and everything `bncli rules`, docs/rules.md and SARIF say about it."""

    id: str
    name: str
    severity: Severity
    summary: str  # one line, for tables
    # (BNLayer, Thresholds) -> Hits for layer rules, (list[BNLayer], Thresholds) -> FileHits for file rules,
    # (Provenance,) -> FileHits for source rules (what the file itself is, whatever its layers)
    check: Callable[..., Hits]
    thresholds: tuple[str, ...] = ()  # the Thresholds fields it uses, for the docs and --help
    scope: str = "layer"  # "layer", "file", "source", or "live" (bncli.watch raises it while training; never inspect)
    detects: str = ""  # what it detects, why it matters, how to fix it: markdown paragraphs (`code` allowed)
    why: str = ""
    fix: str = ""
    example: tuple[str, ...] = ()  # finding lines exactly as `bncli inspect` prints them
    thresholds_note: str = ""  # the thresholds with their defaults, as docs/rules.md shows them ("" = none)
    severity_note: str = ""  # e.g. how an option changes the severity

    @property
    def anchor(self) -> str:
        """The heading's anchor in docs/rules.md (GitHub's rule: lower case, spaces to dashes)."""
        return f"{self.id.lower()}-{self.name}"

    @property
    def help_uri(self) -> str:
        return f"{DOCS_URL}#{self.anchor}"


_CATALOGUE: list[Rule] = []


def rule(id: str, name: str, severity: Severity, summary: str, **doc) -> Callable:
    """Register the decorated check as a rule: adding a rule is this decorator on one function, nothing else.

    Rules run in the order they are defined (shape first: the per-channel rules need one length; file rules last).
    Ids and names are unique and never reused; the text fields are required so that `bncli rules` can explain it.
    """

    def register(check: Callable[..., Hits]) -> Callable[..., Hits]:
        entry = Rule(id, name, severity, summary, check, **doc)
        if any(r.id == id or r.name == name for r in _CATALOGUE):
            raise ValueError(f"rule {id} {name}: id or name already taken")
        if not (entry.detects and entry.why and entry.fix and entry.example):
            raise ValueError(f"rule {id} {name}: detects, why, fix and example are all required")
        _CATALOGUE.append(entry)
        return check

    return register


class RuleSelectionError(UsageError):
    """--select or --ignore (or the config file) names a rule that does not exist."""


def _channels(mask) -> tuple[int, ...]:
    import numpy as np

    return tuple(int(i) for i in np.flatnonzero(mask))


def _show(channels: tuple[int, ...], limit: int = 8) -> str:
    shown = ", ".join(str(c) for c in channels[:limit])
    return shown + (f", ... ({len(channels)} in all)" if len(channels) > limit else "")


def layer_eps(layer: BNLayer, t: Thresholds) -> float:
    """The eps of this layer: its own when the file says it (a whole pickled model), else --eps.

    Every rule that needs eps asks here, so that per-layer eps switches in one place."""
    own = getattr(layer, "eps", None)
    return t.eps if own is None else float(own)


def _is_default_stats(layer: BNLayer) -> bool:
    return bool((layer.running_mean == 0).all() and (layer.running_var == 1).all())


@rule(
    'BN006',
    'shape-mismatch',
    Severity.ERROR,
    'running_mean, running_var, weight, bias of different lengths',
    detects=(
        '`running_mean`, `running_var`, `weight` and `bias` of different lengths, or a layer with 0 channels.'
    ),
    why=(
        '`load_state_dict` refuses the file ("size mismatch"), or code that builds the layer by hand broadcasts the '
        'wrong values to the wrong channels. It comes from model surgery or pruning that forgot one of the four '
        'tensors, or from a broken conversion.'
    ),
    example=('error   BN006 shape-mismatch layer1.bn: lengths differ: running_mean 4, running_var 4, weight 3, bias 4',),
    fix=(
        'Redo the surgery so that all four tensors have `num_features` entries.'
    ),
)
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


@rule(
    'BN001',
    'non-finite',
    Severity.ERROR,
    'NaN or Inf in running_mean, running_var, weight or bias',
    detects=(
        'A NaN or an infinity in `running_mean`, `running_var`, `weight` or `bias`; the finding names the tensor, '
        'the kind and the channels.'
    ),
    why=(
        'In eval mode every output of a channel with a NaN statistic is NaN, and a NaN spreads through every later '
        "layer: the model's predictions become NaN or a constant class (eval accuracy collapses to chance). Running "
        'statistics are an exponential average, so a single diverged training step (an fp16 overflow, a '
        'learning-rate spike, a bad batch) poisons them for good: `0.9 * NaN + 0.1 * x` is still NaN.'
    ),
    example=('error   BN001 non-finite features.5: running_var is NaN in channel(s) 3',),
    fix=(
        'Go back to the last checkpoint without the finding, or recompute the running statistics with forward passes'
        ' in train mode over a few hundred training batches (`torch.no_grad()`, `model.train()`, reset the buffers '
        'first); then find the step that diverged (gradient clipping, a loss scaler for fp16).'
    ),
)
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


@rule(
    'BN002',
    'negative-variance',
    Severity.ERROR,
    'running_var below zero',
    detects=(
        'A `running_var` below zero (`-0.0` and `0.0` are not negative).'
    ),
    why=(
        'PyTorch can never produce one: the running variance is a convex combination of unbiased batch variances, '
        'all ≥ 0. A negative value means the file was edited, converted wrongly (a log-variance or a std stored as '
        'the variance, a sign flip in a conversion script) or corrupted. At run time `sqrt(var + eps)` is NaN when '
        '`var < -eps`, and an enormous scale when `-eps < var < 0`.'
    ),
    example=('error   BN002 negative-variance features.9: running_var is negative in channel(s) 4, which no variance can be: the statistics are corrupt',),
    fix=(
        'Find the conversion or edit that wrote it; recompute the statistics from data.'
    ),
)
def check_negative_var(layer: BNLayer, t: Thresholds) -> Hits:
    bad = _channels(layer.running_var < 0)
    return [(bad, f"running_var is negative in channel(s) {_show(bad)}, which no variance can be: the statistics are corrupt")] if bad else []


@rule(
    'BN003',
    'never-updated',
    Severity.ERROR,
    'running_mean all exactly 0 and running_var all exactly 1',
    detects=(
        'Every `running_mean` exactly 0 and every `running_var` exactly 1: the values `nn.BatchNorm*` is created '
        'with.'
    ),
    why=(
        'In eval mode the layer then normalizes with the identity, so it passes its input through unscaled: '
        'activations reach the next layers with a scale and offset they never saw in training. This is the classic '
        '"eval accuracy is much worse than train accuracy" bug. It happens when a model is trained with '
        '`model.eval()` on (to freeze BN, or by mistake), when the statistics are updated on another copy of the '
        'model (a wrapper, an EMA model whose buffers are not copied), or when the file was saved before any forward'
        ' pass.'
    ),
    example=('error   BN003 never-updated features.1: every running_mean is 0 and every running_var is 1: the statistics were never updated (trained in eval mode, frozen, or saved before any forward pass)',),
    fix=(
        'Run forward passes in train mode over representative training data (no backward pass needed) and save '
        'again; check that the training loop calls `model.train()`.'
    ),
)
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


@rule(
    'BN004',
    'collapsed-variance',
    Severity.WARNING,
    'running_var so small that 1/sqrt(var + eps) explodes',
    thresholds=('min_var', 'eps'),
    detects=(
        'A finite `running_var` in `[0, min-var)`. The finding reports the resulting normalization scale '
        '`1/sqrt(running_var + eps)` for the worst channel: with var → 0 and eps = 1e-5 it reaches 316.'
    ),
    why=(
        'The channel multiplies its input by up to `1/sqrt(eps)`: any small shift of the input distribution at '
        'deployment (another camera, another resize) is amplified a few hundred times. When the BatchNorm is folded '
        "into the preceding convolution for inference or quantization, that filter's weights are multiplied by "
        '`weight/sqrt(var + eps)`: exploding folded weights that wreck int8 quantization ranges. It usually means '
        "the channel's input is constant in training (a dead ReLU upstream, a pruned filter)."
    ),
    example=('warning BN004 collapsed-variance features.5: running_var below 1e-05 in channel(s) 7, 11: the normalization scale 1/sqrt(running_var + eps) reaches 316.1 (channel 7, eps=1e-05)',),
    fix=(
        'If the channel is also dead (BN005) prune it with the filter that feeds it; otherwise check the upstream '
        'layer, recompute the statistics on representative data, or use a larger eps. Pass `--eps` if your layers '
        "use another eps (Keras' default is 1e-3)."
    ),
    thresholds_note="`--min-var` (default: the value of `--eps`), `--eps` (default 1e-5, PyTorch's default; a state dict does not store a layer's eps, a whole pickled model does, and then its own eps is used; with `--eps 0`, as in FrozenBatchNorm2d models, a running_var of exactly 0 is reported too: its scale is infinite)",
)
def check_collapsed_var(layer: BNLayer, t: Thresholds) -> Hits:
    import numpy as np

    var = layer.running_var.astype(np.float64)
    eps = layer_eps(layer, t)
    below_this = eps if t.min_var is None else t.min_var  # the layer's own eps when a whole model says it
    # With eps 0 (FrozenBatchNorm2d models) a zero variance divides by zero, whatever the threshold.
    bad = _channels(np.isfinite(var) & (var >= 0) & ((var < below_this) | ((var == 0) & (eps == 0))))
    if not bad:
        return []
    worst = min(bad, key=lambda c: var[c])
    with np.errstate(divide="ignore"):
        scale = float(1.0 / np.sqrt(var[worst] + eps))
    zeros = int(np.count_nonzero(var[list(bad)] == 0))
    exact = f", {zeros} of the {len(bad)} exactly 0" if zeros and below_this > 0 else ""  # pruned, not tiny
    below = f"running_var below {below_this:g}" if below_this > 0 else "running_var 0"
    return [
        (
            bad,
            f"{below} in channel(s) {_show(bad)}{exact}: the normalization scale "
            f"1/sqrt(running_var + eps) reaches {scale:.4g} (channel {worst}, eps={eps:g})",
        )
    ]


@rule(
    'BN005',
    'dead-channel',
    Severity.INFO,
    '|weight| below a threshold: the channel outputs a constant',
    thresholds=('dead_weight',),
    detects=(
        'Channels whose `|weight|` (gamma) is below the threshold; the finding counts them per layer.'
    ),
    why=(
        'Such a channel outputs (almost) the constant `bias`, whatever its input: the filter that feeds it, and the '
        'channel itself, are wasted compute and memory. L1 penalties on gamma (network slimming) produce them on '
        'purpose, as pruning candidates.'
    ),
    example=('info    BN005 dead-channel features.9: |weight| below 0.001 in 3 channel(s) (0, 2, 5): they output a constant',),
    fix=(
        'Nothing is broken. To save compute, prune the channels with the preceding filters and fold their constant '
        "output into the next layer's bias."
    ),
    thresholds_note='`--dead-weight` (default 1e-3)',
)
def check_dead_channels(layer: BNLayer, t: Thresholds) -> Hits:
    import numpy as np

    if layer.weight is None:
        return []
    bad = _channels(np.isfinite(layer.weight) & (np.abs(layer.weight) < t.dead_weight))
    if not bad:
        return []
    return [(bad, f"|weight| below {t.dead_weight:g} in {len(bad)} channel(s) ({_show(bad)}): they output a constant")]


@rule(
    'BN007',
    'converted-statistics',
    Severity.INFO,
    'num_batches_tracked is 0 while the statistics are not the defaults',
    detects=(
        '`num_batches_tracked` is 0 while the statistics are not the defaults.'
    ),
    why=(
        'PyTorch increments the counter on every training forward pass, so trained statistics with a zero count came'
        ' from elsewhere: a converter from Keras, TensorFlow, ONNX or JAX (which have no such counter), or a hand '
        'edit. Two things then deserve a check: eps (Keras uses 1e-3, PyTorch 1e-5; a converter that forgets it '
        'shifts every output), and fine-tuning with `momentum=None`, where the first training batch replaces the '
        'statistics outright because the cumulative average starts from a count of 0.'
    ),
    example=('info    BN007 converted-statistics layer1.bn: num_batches_tracked is 0 but the statistics are not the defaults: probably converted from another framework (Keras, ONNX, JAX) or edited by hand; check that eps and momentum were carried over',),
    fix=(
        "Check the converter's eps and momentum; set `num_batches_tracked` to a positive count if you fine-tune with"
        ' `momentum=None`.'
    ),
)
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


@rule(
    'BN008',
    'exploding-statistics',
    Severity.WARNING,
    'running_var or |running_mean| beyond a threshold',
    thresholds=('max_var', 'max_mean'),
    detects=(
        'A finite `running_var` above `--max-var` or a `|running_mean|` above `--max-mean` (one finding per tensor).'
    ),
    why=(
        'Activations of a normalized network live within a few units. Statistics this large come from un-normalized '
        'inputs (pixels in 0..255 instead of a mean/std normalization: the first layers then see variances of the '
        'order of 1e4), from a diverging run, or from values near the float16 limit 65504, where the next step '
        'overflows to Inf (BN001). A model whose training inputs were not normalized collapses when deployment code '
        'normalizes them, and vice versa.'
    ),
    example=(
        'warning BN008 exploding-statistics layer1.bn: running_var above 10000 in channel(s) 2 (max 3.2e+05)',
        'warning BN008 exploding-statistics layer1.bn: |running_mean| above 100 in channel(s) 1 (max 412)',
    ),
    fix=(
        'Check the input preprocessing of training and deployment; if large statistics are expected for your data, '
        'raise `--max-var`/`--max-mean` (or `max-var`/`max-mean` in `[tool.bncli]`).'
    ),
    thresholds_note='`--max-var` (default 1e4, a standard deviation of 100), `--max-mean` (default 100)',
)
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


@rule(
    'BN009',
    'low-precision-statistics',
    Severity.WARNING,
    "float16/bfloat16 statistics below the format's normal range",
    detects=(
        "`running_mean` or `running_var` stored as float16 or bfloat16 with a non-zero magnitude below the format's "
        'smallest normal number.'
    ),
    why=(
        'Below it the values are subnormal: float16 then has a fixed spacing of 2^-24 ≈ 6e-8, so a variance of 1e-6 '
        'keeps only a few significant bits (up to 3% rounding error) and anything under 3e-8 becomes 0, and with it '
        'the scale `1/sqrt(var + eps)` changes. This happens when a whole model is cast with `model.half()`, which '
        'casts the BatchNorm buffers too.'
    ),
    example=('warning BN009 low-precision-statistics layer1.bn: running_var is stored as float16 and is below its smallest normal number 6.104e-05 in channel(s) 3: those values are subnormal and have lost precision',),
    fix=(
        'Keep BatchNorm statistics in float32 (use autocast instead of `model.half()`, or cast the BatchNorm modules'
        ' back with `.float()` before saving).'
    ),
    thresholds_note="none (the format's smallest normal number: 2^-14 ≈ 6.1e-5 for float16, 2^-126 ≈ 1.2e-38 for bfloat16)",
)
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


@rule(
    'BN010',
    'untrained-affine',
    Severity.INFO,
    'weight all exactly 1 and bias all exactly 0 while the statistics are trained',
    detects=(
        '`weight` exactly 1 and `bias` exactly 0 in every channel, while the statistics are trained (not the BN003 '
        'defaults).'
    ),
    why=(
        'Those are the initial values: the affine parameters were never trained. Either on purpose (some recipes '
        "freeze gamma and beta) or by mistake: they were left out of the optimizer's parameter groups, had "
        '`requires_grad=False`, or were missing from a checkpoint loaded with `strict=False`, so the model runs '
        'without the scale and shift it learned.'
    ),
    example=('info    BN010 untrained-affine layer1.bn: weight is exactly 1 and bias exactly 0 everywhere while the statistics are trained: the affine parameters were never trained (frozen, not in the optimizer, or not loaded)',),
    fix=(
        "If it was not intended, check the optimizer's parameter groups and the `load_state_dict` call's missing "
        'keys.'
    ),
)
def check_untrained_affine(layer: BNLayer, t: Thresholds) -> Hits:
    if layer.weight is None or layer.bias is None or layer.weight.size == 0:
        return []
    if (layer.weight == 1).all() and (layer.bias == 0).all() and not _is_default_stats(layer):
        return [((), "weight is exactly 1 and bias exactly 0 everywhere while the statistics are trained: the affine "
                     "parameters were never trained (frozen, not in the optimizer, or not loaded)")]
    return []


@rule(
    'BN013',
    'default-channels',
    Severity.WARNING,
    'some channels still hold running_mean 0 and running_var 1',
    detects=(
        'Some channels of a layer hold exactly the initial `running_mean` 0 and `running_var` 1 while its other '
        'channels are trained; the finding lists them. (Every channel at those values is BN003.)'
    ),
    why=(
        'A trained channel never lands on exactly 0 and 1: those channels never saw a batch. It comes from kernels '
        'that skip channels (channels-last SyncBatchNorm bugs), from model surgery that widened a layer and '
        'initialised the new channels only, or from a partial `load_state_dict` that copied some channels. In eval '
        'mode those channels normalize with the wrong statistics, so their outputs are shifted and scaled wrongly.'
    ),
    example=(
        'warning BN013 default-channels layer1.bn: 3 of 64 channel(s) (5, 21, 22) still hold exactly the initial '
        'running_mean 0 and running_var 1 while the others are trained: those channels never saw a batch (a partial '
        'load, model surgery, or a kernel that skipped them)',
    ),
    fix=(
        'Recompute the statistics (`bncli recalibrate`, or forward passes in train mode) and find the step that '
        'skipped the channels: a surgery script, a `strict=False` load, or the SyncBatchNorm and memory format in use.'
    ),
)
def check_default_channels(layer: BNLayer, t: Thresholds) -> Hits:
    default = (layer.running_mean == 0) & (layer.running_var == 1)
    if default.all() or not default.any():
        return []  # all of them is BN003's finding
    bad = _channels(default)
    return [
        (
            bad,
            f"{len(bad)} of {default.size} channel(s) ({_show(bad)}) still hold exactly the initial running_mean 0 and "
            "running_var 1 while the others are trained: those channels never saw a batch (a partial load, model "
            "surgery, or a kernel that skipped them)",
        )
    ]



@rule(
    'BN015',
    'fold-risk',
    Severity.INFO,
    'folded scales |weight|/sqrt(var + eps) spread too far, or beyond float16',
    thresholds=('max_fold_spread', 'eps'),
    detects=(
        'Folding the layer into the preceding convolution multiplies each output channel by '
        '`|weight|/sqrt(running_var + eps)`. The rule reports the largest of these scales, how many times the '
        "layer's median it is, and the channels above `--max-fold-spread` times the median or above float16's "
        'largest value 65504. Dead channels (scale 0, BN005) and invalid statistics (BN001, BN002) are left out of '
        "the median. eps is the layer's own where the file stores it (a whole pickled model), else `--eps`."
    ),
    why=(
        'Per-tensor int8 quantization after folding spends its 255 levels on the largest weights: with one channel '
        "scaled 200 times the median, the other channels' weights fall into a handful of levels, or to zero, and "
        'the quantized model loses accuracy that the float model has. A scale above 65504 overflows to Inf when '
        'the folded model is exported in half precision. It usually comes with a collapsed variance (BN004).'
    ),
    example=(
        'info    BN015 fold-risk features.5: the folded scale |weight|/sqrt(running_var + eps) reaches 313.2 in '
        'channel 11, 224.8x the median 1.393 (eps=1e-05); above 100x the median in channel(s) 7, 11: per-tensor '
        'int8 quantization after folding loses the small channels',
    ),
    fix=(
        'Quantize per channel (most toolkits can), or fix the collapsed channels first (BN004: prune them, or '
        'recompute the statistics on representative data); keep folded weights in float32 where they exceed '
        "float16's range. Raise `--max-fold-spread` (or `max-fold-spread` in `[tool.bncli]`) when your deployment "
        'quantizes per channel.'
    ),
    thresholds_note="`--max-fold-spread` (default 100), `--eps` (default 1e-5)",
)
def check_fold_risk(layer: BNLayer, t: Thresholds) -> Hits:
    import numpy as np

    var = layer.running_var.astype(np.float64)
    gamma = np.ones_like(var) if layer.weight is None else np.abs(layer.weight.astype(np.float64))
    eps = layer_eps(layer, t)
    usable = np.isfinite(var) & (var >= 0) & np.isfinite(gamma)
    if _is_default_stats(layer) or not usable.any():
        return []  # BN003 and BN001/BN002 say what is wrong there
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(usable, gamma / np.sqrt(var + eps), np.nan)  # var + eps == 0 with --eps 0: inf
    live = scale[usable & (scale > 0)]  # dead channels (gamma 0) are BN005's, and say nothing of the spread
    if live.size == 0:
        return []
    median = float(np.median(live))
    top = int(np.nanargmax(np.where(usable, scale, -np.inf)))
    largest = float(scale[top])
    with np.errstate(invalid="ignore"):
        spread_out = _channels(usable & (scale > median * t.max_fold_spread))
        over = _channels(usable & (scale > FLOAT16_MAX))
    if not spread_out and not over:
        return []
    if largest == float("inf"):  # --eps 0 and a variance of 0: a division by zero when folding
        message = (f"the folded scale |weight|/sqrt(running_var + eps) is infinite in channel {top} (running_var + eps "
                   f"is 0), against a median of {median:.4g} (eps={eps:g})")
    else:
        message = (
            f"the folded scale |weight|/sqrt(running_var + eps) reaches {largest:.4g} in channel {top}, "
            f"{largest / median:.4g}x the median {median:.4g} (eps={eps:g})"
        )
    if spread_out:
        message += (
            f"; above {t.max_fold_spread:g}x the median in channel(s) {_show(spread_out)}: per-tensor int8 quantization "
            "after folding loses the small channels"
        )
    if over:
        message += f"; above float16's largest value {FLOAT16_MAX:g} in channel(s) {_show(over)}: a half-precision export overflows"
    return [(tuple(sorted(set(spread_out) | set(over))), message)]


@rule(
    'BN011',
    'no-batchnorm',
    Severity.INFO,
    'no BatchNorm layer in the file',
    scope='file',
    detects=(
        'A readable file in which no key prefix has both `running_mean` and `running_var`. The finding belongs to '
        'the file, not to a layer.'
    ),
    why=(
        'Usually the wrong file: an optimizer state, a tensor file, an export whose BatchNorm layers were fused into'
        ' the convolutions, or a model without BatchNorm at all. A CI gate that expects BatchNorm layers would '
        'otherwise pass such a file silently.'
    ),
    example=('info    BN011 no-batchnorm no BatchNorm layer in the file (no key prefix has both running_mean and running_var)',),
    fix=(
        'Point bncli at the right file; pass `--require-bn` in pipelines where every checkpoint must have BatchNorm '
        'layers.'
    ),
    severity_note='error with `--require-bn` or `require-bn = true`',
)
def check_no_batchnorm(layers: list[BNLayer], t: Thresholds, prov=None) -> FileHits:
    if layers:
        return []
    return [(None, (), "no BatchNorm layer in the file (no key prefix has both running_mean and running_var)")]


@rule(
    'BN014',
    'duplicate-statistics',
    Severity.WARNING,
    'layers of the same size with bit-identical running statistics',
    scope='file',
    detects=(
        'Two or more layers of the same size whose `running_mean` and `running_var` are bit-identical. The finding '
        'belongs to the first of them and names them all. Layers that were never updated (BN003) are left out: '
        'their defaults are alike by design.'
    ),
    why=(
        'Two layers that see different inputs never accumulate the same statistics to the last bit. Identical '
        'buffers mean one is a copy of the other: an EMA model whose BatchNorm buffers were never copied or '
        'averaged (only the parameters were), a module shared between two places and saved twice, or a '
        'checkpoint assembled from the wrong layer. The copy then normalizes with statistics that are not its own.'
    ),
    example=(
        'warning BN014 duplicate-statistics backbone.bn1: backbone.bn1 and ema.bn1 have bit-identical running_mean '
        'and running_var (64 channels): one is a copy of the other (a module shared and saved twice, or an EMA or '
        'copy whose buffers were never updated)',
    ),
    fix=(
        "For an EMA, average or copy the buffers as well as the parameters (timm's `ModelEmaV2` and "
        "`torch.optim.swa_utils.AveragedModel(..., use_buffers=True)` do), or recompute the copy's statistics with "
        '`bncli recalibrate`; `bncli diff ckpt.pt ckpt.pt --state-a model --state-b model_ema` shows how the two '
        'copies differ layer by layer.'
    ),
)
def check_duplicate_statistics(layers: list[BNLayer], t: Thresholds, prov=None) -> FileHits:
    groups: dict[tuple, list[BNLayer]] = {}
    for bn in layers:
        if bn.running_mean.shape != bn.running_var.shape or _is_default_stats(bn):
            continue  # never-updated layers are all alike: BN003 reports each of them
        key = (bn.running_var.size, bn.running_mean.tobytes(), bn.running_var.tobytes())
        groups.setdefault(key, []).append(bn)
    out: FileHits = []
    for same in groups.values():
        if len(same) < 2:
            continue
        names = [bn.name for bn in same]
        if len(names) == 2:
            who, copies = f"{names[0]} and {names[1]}", "one is a copy of the other"
        else:
            who, copies = f"{len(names)} layers ({', '.join(names)})", "they are copies of one another"
        out.append(
            (
                names[0],
                (),
                f"{who} have bit-identical running_mean and running_var ({same[0].num_features} channels): {copies} "
                "(a module shared and saved twice, or an EMA or copy whose buffers were never updated)",
            )
        )
    return out



def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _times(k: int) -> str:
    return {2: "twice", 3: "three times"}.get(k, f"{k} times")


def _layers(names: list[str]) -> str:
    return "1 layer" if len(names) == 1 else f"{len(names)} layers"


def _per_step(count: int, steps: int, who: str) -> tuple:
    """An info hit: `who` counted `count` batches where the checkpoint records `steps` optimizer steps."""
    ratio = count / steps
    if count % steps == 0:
        k = count // steps
        why = f"{k}x: gradient accumulation over {k} batches, or {k} forwards in train mode per step"
    elif count < steps:
        why = (f"{ratio:.3g}x, fewer batches than steps: BatchNorm frozen or in eval() for part of training, or its "
               "counts reset (statistics loaded from another run)")
    else:
        why = f"{ratio:.3g}x, not a whole multiple: a second forward in train mode in some steps only"
    return (None, (), f"{who} counted {count} batches over the {steps} optimizer steps the checkpoint records: {why}",
            Severity.INFO)


@rule(
    'BN016',
    'uneven-batch-counts',
    Severity.WARNING,
    'layers of one state dict counted different numbers of batches (num_batches_tracked)',
    scope='file',
    detects=(
        'Layers of one state dict whose `num_batches_tracked` differ. The layers are grouped by count; each group '
        'that differs from the most common count is one finding, named after its first layer, that says what the '
        'ratio means: a whole multiple k means the layer was updated k times per step (activation checkpointing '
        'recomputes a block in train mode during backward; a second forward in train mode), 0 beside trained counts '
        'means never updated (frozen, or loaded from weights without counts). Where the checkpoint records how many '
        "optimizer steps it took (Lightning's `global_step`, an optimizer state's `step`) the counts are compared "
        'with it too: equal is silent, the same whole ratio k > 1 in every layer is an info (gradient '
        'accumulation over k batches, or k forwards per step). Layers without counts, and layers still at their '
        'initial statistics with a count of 0 (BN003), are left out; no counts, or all equal (and equal to the steps '
        'where known): no finding.'
    ),
    why=(
        'Each update moves the running statistics by `momentum`: a layer updated twice per step follows a '
        'different average than its neighbours (with activation checkpointing, of the same batch twice; with a '
        'validation pass in train mode, of the validation data). The counts are the only trace a state dict keeps '
        'of how often each layer was updated.'
    ),
    example=(
        'warning BN016 uneven-batch-counts blocks.1.bn: 1 layer counted 20 batches, 1 layer 10: 2x, updated twice '
        'per step: activation checkpointing or a second forward in train mode',
    ),
    fix=(
        'With activation checkpointing, keep BatchNorm outside the checkpointed blocks, or save and restore its '
        'buffers around the recomputation (or accept the double update: it is of the same batch); run validation '
        'after `model.eval()`. `bncli.watch(model, optimizer)` names the step and the layer while it trains (BN017, '
        'BN018); `bncli recalibrate` recomputes the statistics afterwards.'
    ),
    severity_note='info when every layer counted the same multiple k > 1 of the optimizer steps the checkpoint records',
)
def check_uneven_counts(layers: list[BNLayer], t: Thresholds, prov=None) -> FileHits:
    # A layer still at its initial statistics is BN003's finding, whatever its count says.
    counted = [(bn.name, bn.num_batches_tracked) for bn in layers
               if bn.num_batches_tracked is not None and not (bn.num_batches_tracked == 0 and _is_default_stats(bn))]
    steps = getattr(prov, "optimizer_steps", None) or None  # 0 steps says nothing to compare with
    groups: dict[int, list[str]] = {}
    for name, count in counted:
        groups.setdefault(count, []).append(name)
    if not groups or set(groups) == {0}:
        return []  # no counts at all, or none trained: BN003 says so layer by layer
    # The reference: the most common trained count; a tie goes to the optimizer steps, then to the smallest count.
    base = min((c for c in groups if c), key=lambda c: (-len(groups[c]), c != steps, c))
    out: FileHits = []
    if steps is not None and base != steps:
        every = len(groups) == 1
        who = ("the only layer" if len(counted) == 1 else f"every layer ({len(counted)})") if every else \
            f"{_layers(groups[base])} ({_names(groups[base])})"
        out.append(_per_step(base, steps, who))
    since = f" (the checkpoint records {steps} optimizer steps)" if steps is not None else ""
    for count in sorted((c for c in groups if c != base), key=lambda c: (c == 0, -c)):
        names = groups[count]
        who = _layers(names) if len(names) == 1 else f"{len(names)} layers ({_names(names)})"
        ratio = count / base
        if count == 0:
            meaning = "never updated: frozen, or loaded from weights without counts"
        elif count % base == 0:
            k = count // base
            meaning = f"{k}x, updated {_times(k)} per step: activation checkpointing or a second forward in train mode"
        elif count > base:
            meaning = (f"{ratio:.3g}x, updated more often than the others: a second forward in train mode in some steps "
                       "(a validation without model.eval())")
        else:
            meaning = (f"{ratio:.3g}x, updated in fewer steps than the others: left in eval() or frozen for part of "
                       "training, or added or reloaded later")
        out.append((names[0], (), f"{who} counted {count} batches, {_layers(groups[base])} {base}{since}: {meaning}"))
    return out


# Globals whose call is code execution by itself (not a class being rebuilt): named as calls in BN012.
DANGEROUS_CALLS = frozenset(
    "posix.system nt.system os.system os.popen os.execv os.execve os.spawnv os.fork subprocess.call subprocess.Popen "
    "subprocess.run subprocess.check_call subprocess.check_output subprocess.getoutput builtins.eval builtins.exec "
    "builtins.compile builtins.__import__ builtins.getattr builtins.setattr builtins.open builtins.breakpoint "
    "importlib.import_module runpy.run_path runpy.run_module pty.spawn webbrowser.open shutil.rmtree "
    "socket.socket pickle.loads _pickle.loads marshal.loads types.FunctionType types.CodeType".split()
)


@rule(
    'BN012',
    'pickled-code',
    Severity.WARNING,
    'loading the file needs torch.load(weights_only=False), which imports and calls what the pickle names',
    scope='source',
    detects=(
        'A torch file whose pickle names globals that `torch.load(weights_only=True)` refuses: a whole pickled '
        'model (`torch.save(model)`, every ultralytics YOLO `.pt`), an `argparse.Namespace` of training arguments, '
        'a custom class, or a `__reduce__` payload that calls `os.system`. bncli reads such files as data with its '
        'own restricted pickle machine (nothing is imported or called) and audits their BatchNorm layers; the '
        'finding lists the globals, sorted, the ones outside torch first, and names separately the calls that run '
        'code by themselves (`posix.system`, `subprocess.Popen`, `builtins.eval`, `builtins.getattr`...).'
    ),
    why=(
        'Whoever loads the file the usual way (`torch.load(path, weights_only=False)`, or any torch before 2.6) '
        'imports every one of those modules and calls every one of those functions: a supply-chain risk that a CI '
        'gate should see beside the BatchNorm audit.'
    ),
    example=(
        'warning BN012 pickled-code only torch.load(weights_only=False) can load this file, which would import 3 '
        'globals (argparse.Namespace, posix.system, torch.nn.modules.batchnorm.BatchNorm2d) and call posix.system, '
        'which runs code by itself; bncli read it as data and imported nothing',
    ),
    fix=(
        'Load only files you trust with `weights_only=False`; publish the weights as a state dict '
        '(`torch.save(model.state_dict(), ...)`) or as safetensors. Teams that accept ultralytics files can '
        '`--ignore pickled-code`.'
    ),
)
def check_pickled_code(prov) -> FileHits:
    names = list(getattr(prov, "pickled_globals", ()))
    if not names:
        return []
    calls = [g for g in prov.pickled_calls if g in DANGEROUS_CALLS]
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    what = f"would import {len(names)} global{'s' if len(names) != 1 else ''} ({shown})"
    if calls:
        what += f" and call {', '.join(calls)}, which runs code by itself"
    return [(None, (), f"only torch.load(weights_only=False) can load this file, which {what}; bncli read it as data "
                       "and imported nothing")]


# ---- live rules: raised by bncli.watch and bncli.lightning while a model trains, never by inspect ----------------
# Their check builds the event's message from what the watch counted (bncli/watch.py calls it).


@rule(
    'BN017',
    'repeated-update',
    Severity.WARNING,
    'a layer updated its statistics more often than the model ran between two optimizer steps',
    scope='live',
    detects=(
        'While training (`bncli.watch(model, optimizer)`, the Lightning callback): a BatchNorm layer whose running '
        'statistics were updated more times between two optimizer steps than the watched model was called in train '
        'mode (when the model itself is not called, only its submodules: than the other layers were), once per '
        'layer, at the forward that updates it once too often (or at the step). Needs the optimizer (its step '
        'hook marks the steps); gradient accumulation (k forwards per step, each layer updated k times) is no '
        'finding.'
    ),
    why=(
        '`torch.utils.checkpoint` recomputes a block in train mode during backward, so its BatchNorm layers are '
        'updated twice per step: a checkpointed BatchNorm2d counts 20 batches over 10 optimizer steps, its '
        'neighbour 10, and its statistics follow another average than everybody thinks. A module called twice in '
        'one forward does the same.'
    ),
    example=(
        'warning BN017 repeated-update block1.1: updated 2 times in step 0, over 1 forward of the model in train '
        'mode: activation checkpointing (torch.utils.checkpoint recomputes the block in train mode during '
        'backward) or a module called twice in one forward',
    ),
    fix=(
        'Keep BatchNorm outside checkpointed blocks (checkpoint the convolutions only), or restore its buffers '
        'around the recomputation; call a shared module once per forward, or give each use its own BatchNorm. '
        'In a saved checkpoint the same defect shows as BN016.'
    ),
)
def repeated_update_message(updates: int, reference: int, step: int, by_model: bool = True) -> str:
    times = f"{reference} time{'s' if reference != 1 else ''}"
    basis = (f"over {reference} forward{'s' if reference != 1 else ''} of the model in train mode" if by_model
             else f"while other layers updated {times}")
    return (f"updated {updates} times in step {step}, {basis}: activation checkpointing (torch.utils.checkpoint "
            "recomputes the block in train mode during backward) or a module called twice in one forward")


@rule(
    'BN018',
    'update-without-grad',
    Severity.WARNING,
    'running statistics changed by a train-mode forward with gradients disabled (validation without model.eval()?)',
    scope='live',
    detects=(
        'While training: a forward of the watched model under `torch.no_grad()` or `torch.inference_mode()` that '
        'updated running statistics, because the layers were in train mode. One event per set of layers. A pass '
        'with `momentum=None` (a cumulative average: what `torch.optim.swa_utils.update_bn` and `bncli '
        'recalibrate` use) is a recalibration and no finding.'
    ),
    why=(
        'A validation loop without `model.eval()` runs under `no_grad` in train mode: it normalizes each '
        'validation batch with its own statistics (the metrics are not those of the deployed model) and pulls '
        '`running_mean`, `running_var` and `num_batches_tracked` towards the validation data.'
    ),
    example=(
        'warning BN018 update-without-grad block0.1: 2 layers (block0.1, block1.1) updated their running statistics '
        'in a train-mode forward with gradients disabled (no_grad or inference_mode) at step 3: validation without '
        'model.eval()?',
    ),
    fix=(
        'Call `model.eval()` before validation and `model.train()` after (Lightning does both for you unless a '
        'callback or hook switches modes); to re-estimate the statistics on purpose, use `bncli.recalibrate` or '
        '`update_bn`.'
    ),
)
def update_without_grad_message(layers: list[str], step: int) -> str:
    who = f"1 layer ({layers[0]})" if len(layers) == 1 else f"{len(layers)} layers ({_names(layers)})"
    return (f"{who} updated {'its' if len(layers) == 1 else 'their'} running statistics in a train-mode forward with "
            "gradients disabled (no_grad or "
            f"inference_mode) at step {step}: validation without model.eval()?")


@rule(
    'BN019',
    'not-updating',
    Severity.INFO,
    'layers that never updated while the others did',
    scope='live',
    detects=(
        'When a watch ends (`.close()`, the end of `with`, the end of `fit`): BatchNorm layers that never updated '
        'their running statistics while other layers did, and in how many steps the others did. Layers that cannot '
        'update (frozen classes without `num_batches_tracked`, `track_running_stats=False`) are left out.'
    ),
    why=(
        'A sub-module left in `eval()` (a backbone frozen on purpose, or by a `.eval()` that was never undone) '
        'keeps the statistics it was loaded with while the layers around it learn new ones; a layer no forward '
        'reaches is dead weight. Either may be what you meant, so this is an info.'
    ),
    example=(
        'info    BN019 not-updating block1.1: 1 layer (block1.1) never updated its running statistics in 10 steps '
        'while 1 other did: a sub-module left in eval() (frozen?), or one no forward reaches',
    ),
    fix=(
        'If the freeze is deliberate, nothing; otherwise find the `.eval()` (or `requires_grad_(False)` helper '
        'that also calls eval) and call `model.train()` after it, at the start of each epoch.'
    ),
)
def not_updating_message(layers: list[str], steps: int, others: int) -> str:
    who = f"1 layer ({layers[0]})" if len(layers) == 1 else f"{len(layers)} layers ({_names(layers)})"
    return (f"{who} never updated {'its' if len(layers) == 1 else 'their'} running statistics in {steps} "
            f"step{'s' if steps != 1 else ''} while {others} other{'s' if others != 1 else ''} did: a sub-module left "
            "in eval() (frozen?), or one no forward reaches")



RULES: tuple[Rule, ...] = tuple(_CATALOGUE)  # in definition order: shape first, file rules last
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
    if all(rule_by_key(i).scope == "live" for i in left):
        raise UsageError(f"--select leaves only live rules ({', '.join(sorted(left))}), which bncli.watch raises while a "
                         "model trains and inspect never runs")
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
    """Findings about the file as a whole (layer None) or across layers (the first layer named); --require-bn raises
    BN011 to an error. Source rules (BN012) run when the file's provenance is given."""
    findings = []
    for rule in RULES:
        if rule.scope in ("layer", "live") or rule.id not in selected:
            continue
        if rule.scope == "source":
            hits = rule.check(provenance) if provenance is not None else []
        else:
            hits = rule.check(layers, thresholds, provenance)
        severity = Severity.ERROR if rule.id == "BN011" and require_bn else rule.severity
        for name, ch, msg, *own in hits:
            findings.append(Finding(rule.id, rule.name, own[0] if own else severity, name, ch, msg))
    return findings
