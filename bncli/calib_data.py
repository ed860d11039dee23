"""Calibration data for `recalibrate`: tensor files or folders of them, planned into batches and read lazily."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bncli.errors import InputError, ShapeError

SUFFIXES = (".pt", ".pth", ".safetensors", ".npy")


@dataclass(frozen=True)
class Source:
    """One tensor in one file: N samples of shape item_shape."""

    path: Path
    fmt: str
    key: str | None
    n: int
    item_shape: tuple[int, ...]


# A batch is a list of (source index, start, end) pieces: a batch may span the end of one file and the start of the next.
Batch = list[tuple[int, int, int]]


def expand(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder stands for its tensor files (by suffix, sorted by name, not recursive)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise InputError(f"{p}: folder holds no tensor files ({', '.join(SUFFIXES)})")
            files.extend(found)
        else:
            files.append(p)
    return files


def discover(paths: list[str | os.PathLike], key: str | None = None) -> list[Source]:
    """Open every file's header (not its data) and check that all hold (N, ...) floating tensors of one shape."""
    sources = []
    for path in expand(paths):
        tensor_like, fmt, used_key, dtype = _open_tensor(path, key)
        shape = tuple(int(d) for d in tensor_like_shape(tensor_like))
        del tensor_like
        if len(shape) < 2:
            raise ShapeError(f"{path}: data has shape {shape}; expected a batch (N, C, ...), e.g. (N, C, H, W)")
        if not dtype.startswith(("float", "bfloat")):
            raise InputError(
                f"{path}: data has dtype {dtype}; recalibrate feeds tensors to the model as they are: "
                "save them as floats, preprocessed as for training"
            )
        if sources and shape[1:] != sources[0].item_shape:
            raise ShapeError(
                f"{path}: samples have shape {shape[1:]}, but {sources[0].path} has {sources[0].item_shape}; "
                "all --data files must hold samples of one shape"
            )
        sources.append(Source(path, fmt, used_key, shape[0], shape[1:]))
    return sources


def plan(sources: list[Source], batch_size: int, num_samples: int | None) -> list[Batch]:
    """Cut the concatenated samples (at most num_samples) into batches of batch_size; the last may be smaller."""
    total = sum(s.n for s in sources)
    if num_samples is not None:
        total = min(total, num_samples)
    batches: list[Batch] = []
    current: Batch = []
    filled = 0
    used = 0
    for index, source in enumerate(sources):
        start = 0
        while start < source.n and used < total:
            take = min(source.n - start, batch_size - filled, total - used)
            current.append((index, start, start + take))
            start += take
            filled += take
            used += take
            if filled == batch_size:
                batches.append(current)
                current, filled = [], 0
    if current:
        batches.append(current)
    return batches


class Reader:
    """Reads batches, opening each file afresh for every piece: no mapping outlives a batch, so memory stays flat."""

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    def read(self, batch: Batch):
        import torch

        parts = [_slice(_array(self.sources[i]), start, end) for i, start, end in batch]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def tensor_like_shape(obj: Any) -> tuple[int, ...]:
    if hasattr(obj, "get_shape"):  # a safetensors slice
        return tuple(obj.get_shape())
    return tuple(obj.shape)


def _slice(obj: Any, start: int, end: int):
    import numpy as np
    import torch

    part = obj[start:end]
    if isinstance(part, np.ndarray):
        return torch.from_numpy(np.array(part))  # a copy, in memory: the memmap is closed after the batch
    return part.clone(memory_format=torch.contiguous_format)


def _array(source: Source) -> Any:
    return _open_tensor(source.path, source.key)[0]


class _Sliceable:
    """A safetensors slice together with its file handle, which must outlive it."""

    def __init__(self, handle: Any, piece: Any) -> None:
        self.handle = handle
        self.piece = piece

    def get_shape(self) -> list[int]:
        return self.piece.get_shape()

    def __getitem__(self, index: slice):
        return self.piece[index]


def _open_tensor(path: Path, key: str | None) -> tuple[Any, str, str | None, str]:
    """The file's tensor as something sliceable without reading it all (numpy memmap, safetensors slice,
    mmapped torch tensor), plus its format, the key used and its dtype name. `key` names the tensor in files
    of named tensors; unnamed ones (.npy, a bare torch tensor) ignore it, so mixed --data lists work."""
    from bncli.archive import SAFETENSORS_DTYPES, check_safetensors
    from bncli.errors import first_line as _first_line
    from bncli.loading import _choose_key, _torch_load, sniff

    fmt = sniff(path)
    if fmt == "npy":
        import numpy as np

        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"{path}: unreadable .npy file ({_first_line(exc)})") from None
        return array, fmt, None, str(array.dtype)
    if fmt == "safetensors":
        check_safetensors(path)  # the same header checks as for checkpoints, before safetensors maps the file
        try:
            from safetensors import safe_open

            handle = safe_open(str(path), framework="pt")
            name = _choose_key(path, list(handle.keys()), key)
            piece = handle.get_slice(name)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: corrupt safetensors file ({_first_line(exc)})") from None
        code = piece.get_dtype()
        return _Sliceable(handle, piece), fmt, name, SAFETENSORS_DTYPES[code][0] if code in SAFETENSORS_DTYPES else code.lower()
    if fmt in ("torch-zip", "torch-legacy"):
        import torch

        obj = _torch_load(path, fmt)
        if isinstance(obj, torch.Tensor):
            name = None  # an unnamed tensor: --key is for the files that hold several
        elif isinstance(obj, dict):
            tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if not tensors:
                raise InputError(f"{path}: holds no tensor")
            name = _choose_key(path, list(tensors), key)
            obj = tensors[name]
        else:
            raise InputError(f"{path}: holds no tensor (found a {type(obj).__name__})")
        return obj, fmt, name, str(obj.dtype).removeprefix("torch.")
    raise InputError(f"{path}: {fmt} files cannot be streamed; use .pt, .safetensors or .npy for --data")


def iterate(sources: list[Source], batches: list[Batch]) -> Iterator[Any]:
    reader = Reader(sources)
    for batch in batches:
        yield reader.read(batch)
