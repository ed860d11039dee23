"""The results bncli computes: frozen dataclasses of plain Python numbers, never tensors."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Severity(str, enum.Enum):
    """How bad a finding is; ordered so that `--fail-on` can compare."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {Severity.INFO: 1, Severity.WARNING: 2, Severity.ERROR: 3}


@dataclass(frozen=True)
class Finding:
    """One rule's verdict on one layer; `channels` are the offending channel indices (empty: the whole layer)."""

    rule: str  # stable id, e.g. "BN001"
    name: str  # short name, e.g. "non-finite"
    severity: Severity
    layer: str | None
    channels: tuple[int, ...]
    message: str


@dataclass(frozen=True)
class Summary:
    """Three order statistics of a per-channel vector (finite values only; None when there are none)."""

    min: float | None
    center: float | None  # mean for running_mean, median for running_var
    max: float | None


PROFILE_WIDTH = 16  # the widest sparkline any renderer draws


@dataclass(frozen=True)
class ChannelRow:
    index: int
    running_mean: float
    running_var: float
    running_std: float
    weight: float | None
    bias: float | None
    flags: tuple[str, ...]


@dataclass(frozen=True)
class LayerReport:
    name: str
    num_features: int
    num_batches_tracked: int | None
    dtype: str
    running_mean: Summary
    running_var: Summary
    weight_abs_min: float | None
    flags: tuple[str, ...]  # names of the rules this layer raised
    channels: tuple[ChannelRow, ...] | None = None  # filled only when one layer is inspected
    # For the sparklines (renderers import no numpy): every channel's value when there are at most PROFILE_WIDTH
    # channels, else one representative channel per bucket of channels, so a report stays small whatever the model.
    running_var_profile: tuple[float, ...] = ()
    weight_abs_profile: tuple[float, ...] | None = None  # None: affine=False
    # From a whole pickled model; None for state dicts, which do not store them (momentum None: unknown or cumulative)
    eps: float | None = None
    momentum: float | None = None
    class_path: str | None = None


@dataclass(frozen=True)
class FileReport:
    path: str
    format: str | None  # None when the file could not be read
    container: str | None
    prefix: str | None
    layers: tuple[LayerReport, ...]
    findings: tuple[Finding, ...]
    error: str | None = None  # why the file could not be read; then layers and findings are empty
    alternatives: tuple[str, ...] = ()  # other state dicts in the file (an EMA copy...), for --state
    model_class: str | None = None  # a whole pickled model read as data: its class
    pickled_globals: int = 0  # how many globals its pickle names that were not imported (BN012 lists them)

    @classmethod
    def unreadable(cls, path: str, error: str) -> FileReport:
        return cls(path, None, None, None, (), (), error)


@dataclass(frozen=True)
class InspectReport:
    files: tuple[FileReport, ...]
    skipped: tuple[str, ...] = ()  # files a directory scan left out: not checkpoints (never an error)

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(f for file in self.files for f in file.findings)

    @property
    def unreadable(self) -> tuple[FileReport, ...]:
        return tuple(f for f in self.files if f.error is not None)

    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), key=lambda s: s.rank, default=None)

    def to_json(self) -> str:
        """Exactly what `bncli inspect --format json` prints for this report."""
        from bncli.render.json import inspect_json

        return inspect_json(self)


@dataclass(frozen=True)
class ChannelStats:
    """One channel before and after BatchNorm; std uses correction=1, as torch.Tensor.std does."""

    index: int
    input_mean: float
    input_std: float
    output_mean: float
    output_std: float
    running_mean: float  # after the forward pass
    running_var: float


@dataclass(frozen=True)
class NormalizeReport:
    input_path: str
    input_key: str | None
    shape: tuple[int, ...]  # as stored in the file
    dtype: str
    mode: str  # "train" | "eval"
    eps: float
    momentum: float | None  # None: cumulative moving average
    affine: bool
    layer_source: str | None  # "CKPT:LAYER", or None for a fresh BatchNorm{kind}(C)
    channels_last: bool
    channels: tuple[ChannelStats, ...]
    output_path: str | None
    warnings: tuple[str, ...] = ()
    kind: str = "2d"  # the layer: BatchNorm1d, 2d or 3d
    from_layer: tuple[str, ...] = ()  # settings taken from a whole pickled model's layer: "eps", "momentum"
