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
        if 0 in shape[1:]:  # N = 0 is a file with no samples, said once for all the files; a sample of no values is not
            raise ShapeError(
                f"{path}: the samples are empty (shape {shape}, a dimension of size 0); BatchNorm needs at least one "
                "value per channel"
            )
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
    """Reads batches, opening each file once: batches come in file order, so only the current file stays open.
    .npy and .safetensors rows are read with plain file reads (no mapping, whose touched pages would stay
    resident: memory stays flat however large the file); a .pt file is loaded once, memory-mapped."""

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources
        self.index: int | None = None
        self.opened: Any = None

    def read(self, batch: Batch):
        import torch

        parts = [_slice(self._open(i), start, end) for i, start, end in batch]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _open(self, index: int) -> Any:
        if index != self.index:
            self.close()  # the previous file is closed before the next one opens
            self.opened = _array(self.sources[index])
            self.index = index
        return self.opened

    def close(self) -> None:
        if isinstance(self.opened, _Rows):
            self.opened.close()
        self.opened = self.index = None


def tensor_like_shape(obj: Any) -> tuple[int, ...]:
    if hasattr(obj, "get_shape"):  # a safetensors slice
        return tuple(obj.get_shape())
    return tuple(obj.shape)


def _slice(obj: Any, start: int, end: int):
    import numpy as np
    import torch

    part = obj[start:end]
    if isinstance(obj, _Rows):
        return part  # already a fresh tensor
    if isinstance(part, np.ndarray):
        return torch.from_numpy(np.array(part))  # a copy: the batch must not keep the memmap's pages alive
    return part.clone(memory_format=torch.contiguous_format)


def _array(source: Source) -> Any:
    """What the reader slices batches from: rows read from the file where the layout allows, else _open_tensor's."""
    if source.fmt == "npy":
        array = _open_tensor(source.path, None)[0]
        if array.flags.c_contiguous:  # not Fortran order: sample i is one run of bytes
            return _Rows(source.path, int(array.offset), tuple(array.shape), np_dtype=array.dtype)
        return array
    if source.fmt == "safetensors":
        import torch

        from bncli.formats.safetensors import SAFETENSORS_DTYPES, check_safetensors

        entry = check_safetensors(source.path)[source.key]
        dtype = getattr(torch, SAFETENSORS_DTYPES[entry.dtype][0])
        return _Rows(source.path, entry.start, entry.shape, torch_dtype=dtype)
    return _open_tensor(source.path, source.key)[0]


class _Rows:
    """Samples [start:end) of a C-ordered (N, ...) array stored raw at `offset`: one seek and one read per slice."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], np_dtype: Any = None, torch_dtype: Any = None) -> None:
        import math

        self.path = path
        self.offset = offset
        self.shape = shape
        self.np_dtype = np_dtype
        self.torch_dtype = torch_dtype
        itemsize = np_dtype.itemsize if np_dtype is not None else torch_dtype.itemsize
        self.row_bytes = math.prod(shape[1:]) * itemsize
        self.fh = path.open("rb")

    def __getitem__(self, index: slice):
        import numpy as np
        import torch

        start, stop, _ = index.indices(self.shape[0])
        buf = bytearray((stop - start) * self.row_bytes)
        self.fh.seek(self.offset + start * self.row_bytes)
        if self.fh.readinto(buf) != len(buf):
            raise InputError(f"{self.path}: truncated: the file ends inside sample {start}..{stop - 1}")
        shape = (stop - start, *self.shape[1:])
        if self.np_dtype is None:
            return torch.frombuffer(buf, dtype=self.torch_dtype).reshape(shape)
        array = np.frombuffer(buf, dtype=self.np_dtype).reshape(shape)
        if not array.dtype.isnative:  # a big-endian .npy: torch takes native byte order only
            array = array.astype(array.dtype.newbyteorder("="))
        return torch.from_numpy(array)

    def close(self) -> None:
        self.fh.close()


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
    from bncli.errors import first_line
    from bncli.formats.safetensors import SAFETENSORS_DTYPES, check_safetensors
    from bncli.loading import _choose_key, sniff, torch_load_checked

    fmt = sniff(path)
    if fmt == "npy":
        import numpy as np

        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"{path}: unreadable .npy file ({first_line(exc)})") from None
        return array, fmt, None, array.dtype.name  # "float32" whatever the byte order
    if fmt == "safetensors":
        header = check_safetensors(path)  # the same header checks as for checkpoints, before safetensors maps the file
        try:
            from safetensors import safe_open

            handle = safe_open(str(path), framework="pt")
            name = _choose_key(path, list(header), key)  # file order, as everywhere
            piece = handle.get_slice(name)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: corrupt safetensors file ({first_line(exc)})") from None
        code = piece.get_dtype()
        return _Sliceable(handle, piece), fmt, name, SAFETENSORS_DTYPES[code][0] if code in SAFETENSORS_DTYPES else code.lower()
    if fmt in ("torch-zip", "torch-legacy"):
        import torch

        obj = torch_load_checked(path, fmt, mmap=True)
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
    try:
        for batch in batches:
            yield reader.read(batch)
    finally:
        reader.close()
