"""The pure constructors a pickle may call: each builds plain data of ours and nothing else (see pickle_vm)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any

from bncli.formats.pickle_vm import Global, Instance, PickleError
from bncli.formats.tensors import V3_DTYPES, LazyStorage, LazyTensor, OpaqueTensor

if TYPE_CHECKING:
    from bncli.formats.pickle_vm import Machine

# torch rebuild functions for tensor kinds bncli does not read; they still count as tensors of a state dict.
OPAQUE_REBUILDS = {
    "torch._utils._rebuild_qtensor": "a quantized tensor",
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch._utils._rebuild_nested_tensor": "a nested tensor",
    "torch._utils._rebuild_meta_tensor_no_storage": "a meta tensor",
    "torch._utils._rebuild_wrapper_subclass": "a tensor-subclass tensor",
    "torch._utils._rebuild_device_tensor_from_numpy": "a device tensor",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": "a device tensor",
    "torch._utils._rebuild_mkldnn_tensor": "a mkldnn tensor",
}
_TENSOR_TYPES = ("torch.Tensor", "torch.nn.parameter.Parameter", "torch.nn.Parameter")


def table(m: Machine) -> dict[str, Any]:
    """The stand-ins for one machine (one load): fresh closures, so nothing is shared between loads."""

    def ordered_dict(items=()):
        out = m.new_container(OrderedDict())
        _fill(m, out, items)
        return out

    def counter(items=()):
        # Counter(mapping) copies it; Counter(iterable) counts its elements (a list of pairs counts the pairs)
        out = m.new_container(Counter())
        if isinstance(items, dict):
            _fill(m, out, items)
            return out
        elements = _iterable(items, "Counter")
        for item in elements:
            m.check_key(item, "a counted element")
        m._grow(out, elements)
        out.update(elements)
        return out

    def default_dict(default_factory=None, items=()):
        # a dict subclass whose factory is never called: its items are plain data, as an OrderedDict's
        out = m.new_container({})
        _fill(m, out, items)
        return out

    def make_set(items=()):
        items = _iterable(items, "set")
        for item in items:
            m.check_key(item, "a set member")
        return m.new_container(set(items), items)

    def make_frozenset(items=()):
        return m.frozen(_iterable(items, "frozenset"))

    def make_bytearray(source=b"", *args):
        return bytearray(_bytes_from(m, source, "bytearray", args))

    def make_bytes(source=b"", *args):
        return bytes(_bytes_from(m, source, "bytes", args))

    def make_complex(real=0.0, imag=0.0):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (real, imag)):
            raise PickleError("complex() of values that are not numbers")
        return complex(real, imag)

    def encode(obj, encoding="latin1"):
        # how protocol-2 pickles spell bytes; only the codec pickle itself emits
        if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
            raise PickleError("_codecs.encode with an unexpected codec")
        return obj.encode("latin1")

    def size(dims=()):
        dims = tuple(_iterable(dims, "torch.Size"))
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise PickleError("torch.Size of values that are not integers")
        return dims

    def rebuild_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        if not isinstance(storage, LazyStorage) or storage.typed is None:
            raise PickleError("a tensor over something that is not a typed storage")
        return _tensor(storage, offset, size, stride, *storage.typed, metadata)

    def rebuild_v1(storage, offset, size, stride):
        return rebuild_v2(storage, offset, size, stride)

    def rebuild_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
        name = dtype.name if isinstance(dtype, Global) and dtype.module == "torch" else None
        if not isinstance(storage, LazyStorage) or name not in V3_DTYPES:
            raise PickleError("a tensor over an untyped storage with an unknown dtype")
        return _tensor(storage, offset, size, stride, V3_DTYPES[name], name, metadata)

    def rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
        if not isinstance(data, (LazyTensor, OpaqueTensor)):
            raise PickleError("a parameter without tensor data")
        if _has_state(state):  # torch setattr()s it on the tensor: `real` or `data` can replace every value
            return OpaqueTensor("a tensor with Python attributes (torch sets them on it, which can change its values)")
        return data

    def parameter(data=None, requires_grad=True):
        return rebuild_parameter(data)

    def from_type_v2(func, new_type, args, state=None):
        # Tensor subclasses and tensors with Python attributes: the values are func(*args); the type is torch's.
        if not (isinstance(new_type, Global) and new_type.path in _TENSOR_TYPES):
            return OpaqueTensor(f"a {new_type.path if isinstance(new_type, Global) else 'unnamed'} tensor subclass")
        if _has_state(state):  # torch setattr()s it on the tensor: `real` or `data` can replace every value
            return OpaqueTensor("a tensor with Python attributes (torch sets them on it, which can change its values)")
        value = m.call(func, args, "REDUCE")
        return value if isinstance(value, (LazyTensor, OpaqueTensor)) else OpaqueTensor("a tensor rebuilt by a call")

    def reconstructor(cls, base=None, state=None, *rest):
        # copyreg._reconstructor(cls, dict, None): how protocols 0/1 (and OrderedDict subclasses) pickle a dict
        # subclass: its items follow as SETITEMS, and they are plain data. Anything else stays a record.
        if isinstance(base, Global) and base.path == "builtins.dict" and state is None and not rest:
            return m.new_container(OrderedDict())
        func = m.name_global("copyreg", "_reconstructor")
        return m.new_container(Instance(func, (cls, base, state, *rest), "REDUCE"), (cls, base, state))

    def opaque(kind):
        def build(*args):
            return OpaqueTensor(kind)

        return build

    return {
        "collections.OrderedDict": ordered_dict,
        "collections.Counter": counter,
        "collections.defaultdict": default_dict,
        "copyreg._reconstructor": reconstructor,
        "builtins.set": make_set,
        "builtins.frozenset": make_frozenset,
        "builtins.bytearray": make_bytearray,
        "builtins.bytes": make_bytes,
        "builtins.complex": make_complex,
        "_codecs.encode": encode,
        "torch.Size": size,
        "torch._utils._rebuild_tensor": rebuild_v1,
        "torch._utils._rebuild_tensor_v2": rebuild_v2,
        "torch._utils._rebuild_tensor_v3": rebuild_v3,
        "torch._utils._rebuild_parameter": rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
        "torch.nn.parameter.Parameter": parameter,
        "torch._tensor._rebuild_from_type_v2": from_type_v2,
        **{path: opaque(kind) for path, kind in OPAQUE_REBUILDS.items()},
    }


def _has_state(state: Any) -> bool:
    """Whether a tensor's pickled Python state is non-empty (a dict, or a (dict, slots) pair)."""
    if isinstance(state, tuple) and len(state) == 2:
        return any(_has_state(part) for part in state)
    return state is not None and not (isinstance(state, dict) and not state)


def _tensor(storage, offset, size, stride, np_type, dtype, metadata):
    if metadata:  # conj/neg bits and the like change the values: not read
        return OpaqueTensor("a tensor with metadata (conjugate or negative bits)", dtype)
    return LazyTensor(storage, offset, size, stride, np_type, dtype)


def _iterable(items: Any, what: str) -> list:
    if type(items) in (list, tuple, set, frozenset) or isinstance(items, frozenset):
        return list(items)
    raise PickleError(f"{what}() of a {type(items).__name__}")


def _fill(m: Machine, out: dict, items: Any) -> None:
    if isinstance(items, dict):
        items = list(items.items())
    for pair in _iterable(items, type(out).__name__):
        if type(pair) not in (tuple, list) or len(pair) != 2:
            raise PickleError(f"{type(out).__name__}() of something that is not (key, value) pairs")
        m.check_key(pair[0], "a dictionary key")
        m._grow(out, pair)
        out[pair[0]] = pair[1]


def _bytes_from(m: Machine, source: Any, what: str, args: tuple) -> Any:
    """bytes/bytearray: from bytes, str (with a codec) or a list of small ints as pickle writes them, or of a
    bare size, which allocates from nothing and is charged to the load's budget before anything happens."""
    if isinstance(source, bool) or isinstance(source, Instance | Global):
        raise PickleError(f"{what}() of a {type(source).__name__}")
    if isinstance(source, int):
        if source < 0:
            raise PickleError(f"{what}() of a negative size")
        m.budget.amplify(source, f"its pickle's {what}({source})")
        return source
    if isinstance(source, (bytes, bytearray)):
        return source
    if isinstance(source, str):
        encoding = args[0] if args else None
        if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
            raise PickleError(f"{what}() of text with an unexpected codec")
        return source.encode(encoding)
    if type(source) is list and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in source):
        return source
    raise PickleError(f"{what}() of a {type(source).__name__}")
