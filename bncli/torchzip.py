"""Read torch.save zip checkpoints without importing torch: a restricted unpickler and lazy, byte-exact tensor views."""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import pickletools
import zlib
from collections import Counter, OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bncli.archive import ZipRecord


class Unsupported(Exception):
    """Something this reader does not handle (or refuses): the caller falls back to torch.load(weights_only=True)."""


# torch storage classes -> (numpy dtype, bncli dtype name). Anything else (complex, quantized, float8...) is
# left to torch. bfloat16 has no numpy dtype: its raw 16 bits are read as uint16 and widened on read.
STORAGE_DTYPES = {
    "DoubleStorage": ("f8", "float64"),
    "FloatStorage": ("f4", "float32"),
    "HalfStorage": ("f2", "float16"),
    "BFloat16Storage": ("u2", "bfloat16"),
    "LongStorage": ("i8", "int64"),
    "IntStorage": ("i4", "int32"),
    "ShortStorage": ("i2", "int16"),
    "CharStorage": ("i1", "int8"),
    "ByteStorage": ("u1", "uint8"),
    "BoolStorage": ("?", "bool"),
}

# The opcodes torch's weights_only unpickler (torch/_weights_only_unpickler.py) implements; a pickle using any
# other one is one torch would refuse, so it is handed to torch to refuse with its own message.
ALLOWED_OPCODES = frozenset(
    "GLOBAL NEWOBJ REDUCE BUILD APPEND APPENDS SETITEM SETITEMS MARK TUPLE TUPLE1 TUPLE2 TUPLE3 NONE NEWFALSE "
    "NEWTRUE EMPTY_TUPLE EMPTY_LIST EMPTY_DICT EMPTY_SET BININT BININT1 BININT2 BINFLOAT BINUNICODE "
    "SHORT_BINSTRING BINPERSID BINGET LONG_BINGET BINPUT LONG_BINPUT LONG1 PROTO STOP".split()
)

_ITEMSIZE = {"f8": 8, "f4": 4, "f2": 2, "u2": 2, "i8": 8, "i4": 4, "i2": 2, "i1": 1, "u1": 1, "?": 1}


class LazyStorage:
    """One storage record of the archive: where its bytes are, read only when a tensor view asks."""

    __slots__ = ("archive", "record", "np_dtype", "dtype", "numel")

    def __init__(self, archive: _Archive, record: ZipRecord, np_dtype: str, dtype: str, numel: int) -> None:
        self.archive, self.record, self.np_dtype, self.dtype, self.numel = archive, record, np_dtype, dtype, numel

    def __setstate__(self, state):  # BUILD must not rewrite where the bytes are read from
        raise Unsupported("BUILD on a storage")


class LazyTensor:
    """A tensor as torch would rebuild it (storage, offset, shape, strides), materialized to numpy on demand."""

    __slots__ = ("storage", "offset", "shape", "stride", "requires_grad")

    def __init__(self, storage: LazyStorage, offset: int, shape: tuple, stride: tuple, requires_grad: bool) -> None:
        if not isinstance(storage, LazyStorage):
            raise Unsupported(f"tensor over a {type(storage).__name__}, not a storage")
        if not (_int_tuple(shape) and _int_tuple(stride) and len(shape) == len(stride)):
            raise Unsupported("tensor shape or stride is not a tuple of integers")
        if not isinstance(offset, int) or offset < 0 or any(d < 0 for d in shape) or any(s < 0 for s in stride):
            raise Unsupported("negative size, stride or offset")
        if 0 not in shape and offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True)) >= storage.numel:
            raise Unsupported("tensor view reaches past the end of its storage")
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)
        self.requires_grad = bool(requires_grad)

    def __setstate__(self, state):
        raise Unsupported("BUILD on a tensor")

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"

    def numpy(self):
        """The values as a new numpy array (bfloat16 widened to float32), reading only the bytes the view spans."""
        import numpy as np

        st = self.storage
        item = np.dtype(st.np_dtype).itemsize
        if 0 in self.shape:
            raw = np.empty(self.shape, dtype=st.archive.byteorder + st.np_dtype)
        else:
            span = 1 + sum((d - 1) * s for d, s in zip(self.shape, self.stride, strict=True))
            buf = st.archive.read_range(st.record, self.offset * item, span * item, whole=st.numel * item)
            flat = np.frombuffer(buf, dtype=st.archive.byteorder + st.np_dtype)
            raw = np.lib.stride_tricks.as_strided(flat, self.shape, tuple(s * item for s in self.stride))
        array = raw.astype(raw.dtype.newbyteorder("="), copy=True)
        if st.dtype == "bfloat16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)


def _int_tuple(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


# --------------------------------------------------------------------------- the archive


class _Archive:
    """The zip file, checked by bncli.archive.check_torch_zip for structure; each record's CRC is checked when it
    is read whole, so a 4 GB checkpoint costs only the bytes of the tensors asked for."""

    def __init__(self, path: Path) -> None:
        from bncli.archive import check_torch_zip

        self.path = path
        self.zip = check_torch_zip(path, verify_crc=False)  # damage here is an InputError, as on torch's path
        self.data_pkl = self._read_checked("data.pkl")
        order = self._read_checked("byteorder") if "byteorder" in self.zip.records else b"little"
        byteorder = order.decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise Unsupported(f"byteorder record says {byteorder!r}")
        self.byteorder = "<" if byteorder == "little" else ">"

    def _read_checked(self, name: str) -> bytes:
        from bncli.archive import crc_error, read_record

        record = self.zip.records[name]
        data = read_record(self.path, record)
        if zlib.crc32(data) != record.crc:
            raise crc_error(self.path, record)
        return data

    def read_range(self, record: ZipRecord, start: int, length: int, whole: int) -> bytes:
        """`length` bytes of `record` from `start`; the CRC is checked when the read covers the record."""
        from bncli.archive import crc_error, show
        from bncli.errors import InputError

        if record.size < whole or start + length > record.size:
            raise InputError(f"{show(self.path)}: corrupt: record {record.name!r} holds {record.size} bytes, fewer than its storage needs")
        data = _read_at(self.path, record.data_offset + start, length)
        if len(data) != length:
            raise InputError(f"{show(self.path)}: truncated: record {record.name!r} ends past the end of the file")
        if start == 0 and length == record.size and zlib.crc32(data) != record.crc:
            raise crc_error(self.path, record)
        return data


def _read_at(path: Path, offset: int, length: int) -> bytes:
    """The one place storage bytes are read from disk (tests count the bytes that pass through here)."""
    with path.open("rb", buffering=0) as fh:
        return os.pread(fh.fileno(), length, offset)


# --------------------------------------------------------------------------- the unpickler


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if metadata:  # conj/neg bits and the like: leave them to torch
        raise Unsupported("tensor metadata")
    return LazyTensor(storage, storage_offset, size, stride, requires_grad)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, LazyTensor):
        raise Unsupported("parameter without tensor data")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    if state:
        raise Unsupported("parameter with extra state")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _encode(obj, encoding="latin1"):
    # how protocol-2 pickles spell bytes; only the codecs pickle itself emits
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise Unsupported("_codecs.encode with an unexpected codec")
    return obj.encode("latin1")


def _bytearray(source=b"", *args):
    """bytearray, except from a bare size: every other object a pickle builds is bounded by the pickle's own
    length, but bytearray(2**31) is a 2 GB allocation from a few bytes. No state dict needs that; torch.load
    would allocate it, so the file is refused here instead of being handed over."""
    if isinstance(source, int) and source > _MAX_BYTEARRAY:
        raise _Refused(f"refused: its pickle asks for bytearray({source}), {source} bytes from nothing; no state dict needs that")
    return bytearray(source, *args)


class _Refused(Exception):
    """The file is refused outright (handing it to torch.load would do the harm)."""


_MAX_BYTEARRAY = 1 << 20


class _StorageType:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


# The globals a plain state dict needs, each mapped to a torch-free stand-in. torch's weights_only loader allows
# a few more (torch.Size, torch.device, dtypes, sparse and quantized rebuilds, tensor subclasses...): those,
# and anything torch refuses, raise Unsupported so torch.load(weights_only=True) decides.
_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "Counter"): Counter,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("_codecs", "encode"): _encode,
    ("builtins", "set"): set,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "complex"): complex,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: _Archive) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.storages: dict[str, LazyStorage] = {}

    def find_class(self, module: str, name: str):
        # protocol 2 spells Python 2 names (__builtin__.set); map them as pickle and torch do
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        found = _GLOBALS.get((module, name))
        if found is None:
            raise Unsupported(f"global {module}.{name}")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise Unsupported(f"persistent id {type(pid).__name__}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise Unsupported("malformed storage id")
        if key in self.storages:  # views of one storage share it, as in torch
            return self.storages[key]
        record = self.archive.zip.storage(key)
        if record is None:
            raise Unsupported(f"no record data/{key}")
        np_dtype, dtype = STORAGE_DTYPES[kind.name]
        if record.size < numel * _ITEMSIZE[np_dtype]:
            raise Unsupported(f"record {record.name} is smaller than its storage")
        storage = LazyStorage(self.archive, record, np_dtype, dtype, numel)
        self.storages[key] = storage
        return storage


def _check_opcodes(data: bytes) -> None:
    if not data.startswith(b"\x80\x02"):
        raise Unsupported("not a protocol-2 pickle")
    try:
        for op, _arg, _pos in pickletools.genops(data):
            if op.name not in ALLOWED_OPCODES:
                raise Unsupported(f"pickle opcode {op.name}")
    except Unsupported:
        raise
    except Exception as exc:  # noqa: BLE001 - pickletools' parser on damaged bytes
        raise Unsupported(f"malformed pickle ({exc})") from None


def load(path: str | os.PathLike) -> Any:
    """The object torch.load(path, weights_only=True) would return, with LazyTensor in place of each tensor.

    Raises Unsupported for anything outside a plain (possibly nested) state dict of dense tensors, including
    every pickle torch would refuse; nothing in the file is ever called except the stand-ins above.
    """
    archive = _Archive(Path(path))
    _check_opcodes(archive.data_pkl)
    try:
        return _Unpickler(archive.data_pkl, archive).load()
    except Unsupported:
        raise
    except _Refused as exc:
        from bncli.archive import show
        from bncli.errors import InputError

        raise InputError(f"{show(path)}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of a hostile or odd pickle: let torch judge the file
        raise Unsupported(f"{type(exc).__name__}: {exc}") from None
