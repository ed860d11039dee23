"""Tensors as torch would rebuild them from a pickle (storage, offset, shape, strides), read to numpy only on demand."""

from __future__ import annotations

from typing import Any, Protocol

from bncli.budget import Budget

# torch's typed storage classes -> (numpy type of the raw items, the dtype name torch reports).
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
    "ComplexFloatStorage": ("c8", "complex64"),
    "ComplexDoubleStorage": ("c16", "complex128"),
    # quantized storages hold raw integers; their tensors are rebuilt as OpaqueTensor
    "QUInt8Storage": ("u1", "quint8"),
    "QInt8Storage": ("i1", "qint8"),
    "QInt32Storage": ("i4", "qint32"),
    "QUInt4x2Storage": ("u1", "quint4x2"),
    "QUInt2x4Storage": ("u1", "quint2x4"),
}
# dtypes of _rebuild_tensor_v3 (an untyped storage and a dtype), by torch's name -> numpy type of the raw items.
# float8 has no numpy type: its raw bytes are kept, and reading its values is refused (nothing bncli computes
# takes float8 statistics).
V3_DTYPES = {
    **{name: np_type for np_type, name in STORAGE_DTYPES.values()},
    "uint16": "u2", "uint32": "u4", "uint64": "u8",
    "float8_e4m3fn": "u1", "float8_e5m2": "u1", "float8_e4m3fnuz": "u1", "float8_e5m2fnuz": "u1", "float8_e8m0fnu": "u1",
}
RAW_ONLY = frozenset(n for n in V3_DTYPES if n.startswith("float8"))

_ITEMSIZE = {"f8": 8, "f4": 4, "f2": 2, "u2": 2, "i8": 8, "i4": 4, "i2": 2, "i1": 1, "u1": 1, "?": 1, "c8": 8,
             "c16": 16, "u4": 4, "u8": 8}


def itemsize(np_type: str) -> int:
    return _ITEMSIZE[np_type]


class Source(Protocol):
    """Where a storage's bytes are: the format reader."""

    budget: Budget
    byteorder: str  # "<" or ">"

    def read_storage(self, ref: Any, start: int, length: int, whole: int) -> bytes: ...


class LazyStorage:
    """One storage of the file: which bytes, read only when a tensor view asks."""

    __slots__ = ("source", "ref", "nbytes", "typed")

    def __init__(self, source: Source, ref: Any, nbytes: int, typed: tuple[str, str] | None) -> None:
        self.source, self.ref, self.nbytes = source, ref, nbytes
        self.typed = typed  # (numpy type, dtype name) of a typed storage; None for an untyped one


class LazyTensor:
    """A dense tensor view of a storage, materialized to a numpy array of its own on demand."""

    __slots__ = ("storage", "offset", "shape", "stride", "np_type", "dtype")

    def __init__(self, storage: Any, offset: Any, shape: Any, stride: Any, np_type: str, dtype: str) -> None:
        from bncli.formats.pickle_vm import PickleError

        if not isinstance(storage, LazyStorage):
            raise PickleError(f"a tensor over a {type(storage).__name__}, not a storage")
        if not (_int_tuple(shape) and _int_tuple(stride) and len(shape) == len(stride)):
            raise PickleError("a tensor whose shape or stride is not a tuple of integers")
        if not _is_int(offset) or offset < 0 or any(d < 0 for d in shape) or any(s < 0 for s in stride):
            raise PickleError("a tensor with a negative size, stride or offset")
        item = itemsize(np_type)
        if storage.nbytes % item:
            raise PickleError(f"a {dtype} tensor over a storage of {storage.nbytes} bytes, not a whole number of items")
        if 0 not in shape and (offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True)) + 1) * item > storage.nbytes:
            raise PickleError("a tensor view reaches past the end of its storage")
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)
        self.np_type, self.dtype = np_type, dtype

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

    def numpy(self, raw: bool = False):
        """The values as a new numpy array (bfloat16 widened exactly to float32), reading only the bytes the view
        spans. Both the bytes read and a view that repeats bytes (stride 0, overlapping strides) are charged to
        the load's budget before anything is allocated. `raw` gives float8's bytes (as uint8), for torch."""
        import numpy as np

        if self.dtype in RAW_ONLY and not raw:
            raise ValueError(f"bncli cannot compute with {self.dtype} values")
        source = self.storage.source
        item = itemsize(self.np_type)
        order = "|" if item == 1 else source.byteorder
        if order == ">":
            # torch swaps a big-endian archive's storage once, in groups of the storage's own element size (none
            # for an untyped storage), then views the bytes natively: match that, or refuse what it cannot mean
            width = itemsize(self.storage.typed[0]) if self.storage.typed else 1
            if width == 1:
                order = "<"
            elif width != item:
                raise ValueError(f"a {self.dtype} view of a storage of {width}-byte items in a big-endian archive")
        numel = self.numel()
        if numel == 0:
            array = np.empty(self.shape, dtype=np.dtype(self.np_type).newbyteorder("="))
        else:
            span = 1 + sum((d - 1) * s for d, s in zip(self.shape, self.stride, strict=True))
            materialized = numel * item
            if materialized > span * item:
                source.budget.amplify(materialized - span * item, f"a {self.shape} view that repeats the bytes of its storage")
            source.budget.charge(span * item, "a tensor")
            raw = source.read_storage(self.storage.ref, self.offset * item, span * item, self.storage.nbytes)
            flat = np.frombuffer(raw, dtype=np.dtype(order + self.np_type) if item > 1 else np.dtype(self.np_type))
            view = np.lib.stride_tricks.as_strided(flat, self.shape, tuple(s * item for s in self.stride), writeable=False)
            array = view.astype(view.dtype.newbyteorder("="), copy=True)
        if self.dtype == "bfloat16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)


class OpaqueTensor:
    """A tensor kind torch can rebuild but bncli does not read (quantized, sparse, nested, meta, subclasses):
    it counts as a tensor of the state dict, and reading its values is an input error that names the kind."""

    __slots__ = ("kind", "shape", "dtype")

    def __init__(self, kind: str, dtype: str = "unknown") -> None:
        self.kind, self.dtype, self.shape = kind, dtype, None

    ndim = 0

    def numpy(self):
        raise ValueError(f"{self.kind}, whose values bncli does not read")

    def __repr__(self) -> str:
        return f"OpaqueTensor({self.kind})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) <= 64 and all(_is_int(v) for v in value)
