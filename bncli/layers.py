"""Find BatchNorm layers in a flat state dict: every key prefix with both running_mean and running_var."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bncli.errors import InputError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from bncli.loading import Checkpoint

BUFFERS = ("running_mean", "running_var", "weight", "bias", "num_batches_tracked")
ROOT = "<root>"
# The dtypes bncli reads statistics in; float16/bfloat16 are widened to float32 on reading (loading.Checkpoint.read).
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # the name shown for a layer whose keys have no prefix at all


@dataclass(frozen=True)
class LayerKeys:
    """The state-dict keys of one BatchNorm layer (BatchNorm1d/2d/3d and SyncBatchNorm look the same)."""

    name: str
    running_mean: str
    running_var: str
    weight: str | None = None
    bias: str | None = None
    num_batches_tracked: str | None = None


@dataclass
class BNLayer:
    """One layer's arrays, read from the file; weight and bias are None for affine=False layers."""

    name: str
    running_mean: np.ndarray
    running_var: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    num_batches_tracked: int | None
    dtype: str  # dtype of running_var as stored, e.g. "float32" or "bfloat16"
    # What a whole pickled model says of the module (None for state dicts, which do not store them)
    eps: float | None = None
    momentum: float | None = None
    momentum_given: bool = False  # whether momentum was stated (then None means a cumulative average)
    class_path: str | None = None  # e.g. "torch.nn.modules.batchnorm.BatchNorm2d"

    @property
    def num_features(self) -> int:
        return int(self.running_var.shape[0]) if self.running_var.ndim else 1


# Formats whose key order is not the model's: safetensors sorts its keys as strings ("1, 10, 4, 7").
UNORDERED_FORMATS = ("safetensors",)


def find_layers(keys: Iterable[str]) -> list[LayerKeys]:
    """Group keys into BatchNorm layers, in the order their first key appears in the file; for a file that does
    not keep module order (a Checkpoint of a format in UNORDERED_FORMATS), in natural order (`blocks.2` before
    `blocks.10`)."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        if leaf in BUFFERS:
            groups.setdefault(prefix or ROOT, {})[leaf] = key
    layers = [
        LayerKeys(name=name, **found)
        for name, found in groups.items()
        if "running_mean" in found and "running_var" in found
    ]
    if getattr(getattr(keys, "provenance", None), "format", None) in UNORDERED_FORMATS:
        layers.sort(key=lambda layer: natural_key(layer.name))
    return layers


_NUMBER = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key comparing the numeric parts of a name as numbers: blocks.2 < blocks.10 < blocks.10a."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _NUMBER.split(name) if part)


class UnknownLayer(UsageError):
    """--layer names no BatchNorm layer of the file: the user's argument (exit 2), not a bad file."""


def select_layer(layers: list[LayerKeys], name: str, path: str, prefix: str | None = None) -> LayerKeys:
    """The layer called `name`, as listed (prefix stripped) or as stored in the file (`module.bn1` when the
    file's 'module.' was stripped); an unknown name is a usage error that suggests the nearest names: those one
    is a dotted suffix of first (`bn1` for `layer1.0.bn1`), then the most similar."""
    by_name = {layer.name: layer for layer in layers}
    for candidate in _spellings(name, prefix):
        if candidate in by_name:
            return by_name[candidate]
    if not layers:
        raise UnknownLayer(f"{path}: no BatchNorm layer found, so no layer {name!r}")
    wanted = _spellings(name, prefix)[-1]
    longer = [n for n in by_name if n.endswith("." + wanted)]  # `bn1` -> layer1.0.bn1
    shorter = [n for n in by_name if wanted.endswith("." + n) and n not in longer]  # `x.layer1.0.bn1` -> layer1.0.bn1
    suffix = longer + shorter
    # Closest first; ties keep file order (difflib.get_close_matches would break them by reversed name).
    ratio = {n: difflib.SequenceMatcher(None, wanted, n).ratio() for n in by_name if n not in suffix}
    similar = sorted((n for n in ratio if ratio[n] >= 0.4), key=lambda n: -ratio[n])
    near = (suffix + similar)[:5] or list(by_name)[:5]
    raise UnknownLayer(f"{path}: no BatchNorm layer named {name!r}; nearest: {', '.join(near)}")


def _spellings(name: str, prefix: str | None) -> list[str]:
    """`name`, then `name` without the prefix the loader stripped (or the wrapper prefixes it strips)."""
    out = [name]
    if prefix and name.startswith(prefix) and len(name) > len(prefix):
        out.append(name[len(prefix):])
    rest = name
    while rest.startswith(("module.", "_orig_mod.")):
        rest = rest.split(".", 1)[1]
        out.append(rest)
    return list(dict.fromkeys(out))


def read_layer(ckpt: Checkpoint, keys: LayerKeys) -> BNLayer:
    """Read one layer's arrays; statistics that are not floating point are an input error."""
    path = ckpt.provenance.path
    arrays = {}
    for field in ("running_mean", "running_var", "weight", "bias"):
        key = getattr(keys, field)
        if key is None:
            arrays[field] = None
            continue
        dtype = ckpt.dtype(key)
        if dtype == "unreadable":
            ckpt.read(key)  # raises the input error that says what kind of tensor it is
        if dtype not in FLOAT_DTYPES:
            raise InputError(
                f"{path}: {key} has dtype {dtype}; BatchNorm parameters and statistics must be "
                "float16, bfloat16, float32 or float64"
            )
        array = ckpt.read(key)
        if array.ndim > 1:
            raise InputError(f"{path}: {key} has shape {tuple(array.shape)}; BatchNorm tensors are 1-D (num_features,)")
        arrays[field] = array.reshape(-1)
    meta = ckpt.layer_meta.get(keys.name)
    return BNLayer(
        name=keys.name,
        num_batches_tracked=_count(ckpt, keys.num_batches_tracked),
        dtype=ckpt.dtype(keys.running_var),
        eps=meta.eps if meta else None,
        momentum=meta.momentum if meta else None,
        momentum_given=meta.momentum_given if meta else False,
        class_path=meta.class_path if meta else None,
        **arrays,
    )


def _count(ckpt: Checkpoint, key: str | None) -> int | None:
    """num_batches_tracked is a 0-d tensor in torch, but a plain int or a 1-element tensor in the wild."""
    if key is None:
        return None
    array = ckpt.read(key)
    if array.size != 1:
        raise InputError(f"{ckpt.provenance.path}: {key} has shape {tuple(array.shape)}; expected a single count")
    value = array.reshape(())
    item = value.item() if value.dtype.kind in "iufcb" else None
    if value.dtype.kind not in "iuf" or value != value or abs(float(value)) == float("inf") or (
        value.dtype.kind == "f" and float(value) != int(value)
    ):
        shown = repr(item) if item is not None else f"a {value.dtype} value"
        raise InputError(f"{ckpt.provenance.path}: {key} is {shown}; expected an integer count")
    return int(value)
