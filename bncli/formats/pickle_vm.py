"""The one restricted pickle machine: reads any torch pickle as data, and never imports or calls what the file names.

Every torch format goes through it (zip `data.pkl`, the legacy format's pickles, whole pickled models). The
opcodes are decoded by `pickletools.genops` (pure parsing) and interpreted here:

- A global on a small allowlist of pure constructors (OrderedDict, set, the tensor rebuild functions...) maps to a
  stand-in of ours, a plain function that builds plain data. Every other global becomes an inert `Global` record.
- REDUCE / NEWOBJ / INST / OBJ on a record make an `Instance` record (what would have been called, with what);
  BUILD on an Instance stores the state in it; BUILD anywhere else is refused, except the `_metadata` that torch
  itself sets on a state dict's OrderedDict. Nothing is ever executed: `getattr`, `eval`, `os.system` stay records.
- Records are created per load, and nothing a pickle can reach is shared between two loads.
- Budgets (bncli/budget.py) are charged before the work: opcodes, bytes allocated from nothing (bytearray(n)),
  items reachable through memo references (a tuple DAG expands exponentially), and only flat values are ever
  hashed (dict keys, set members), so no `hash()` can walk a DAG forever.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from bncli.budget import MAX_EXPANDED_ITEMS, Budget


class PickleError(Exception):
    """The pickle is damaged, or asks for something this machine refuses; the reader names the file."""


class Global:
    """An inert record of a global the pickle names (`module.name`), never imported."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "name", name)

    def __setattr__(self, key, value):  # nothing may rewrite what a record names
        raise PickleError("attribute write on a global")

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<global {self.path}>"


class Instance:
    """An inert record of what the pickle would have called or constructed: `func(*args)`, then its state.

    `via` says how (reduce, newobj, inst, obj). `items` and `dictitems` hold what APPEND(S)/SETITEM(S) added
    to it (list and dict subclasses); `state` what BUILD gave it.
    """

    __slots__ = ("func", "args", "kwargs", "via", "state", "items", "dictitems")

    def __init__(self, func: Any, args: tuple, via: str, kwargs: dict | None = None) -> None:
        self.func, self.args, self.via, self.kwargs = func, args, via, kwargs
        self.state: Any = None
        self.items: list | None = None
        self.dictitems: list | None = None

    @property
    def cls(self) -> Global | None:
        """The class this object would be an instance of, when the pickle says it plainly."""
        func = self.func
        if isinstance(func, Global) and func.path in ("copyreg.__newobj__", "copyreg._reconstructor", "copyreg.__newobj_ex__"):
            func = self.args[0] if self.args else None
        return func if isinstance(func, Global) else None

    @property
    def class_path(self) -> str | None:
        cls = self.cls
        return cls.path if cls is not None else None

    def __repr__(self) -> str:
        return f"<instance of {self.class_path or 'an unnamed call'}>"


# --------------------------------------------------------------------------- what torch.load(weights_only=True) allows

# A global outside these is what makes a file loadable only with weights_only=False (rule BN012). The set follows
# torch 2.13's torch/_weights_only_unpickler.py:_get_allowed_globals, written out so that no torch is needed.
_TORCH_SAFE = frozenset(
    "_codecs.encode builtins.bytearray builtins.complex builtins.set collections.Counter collections.OrderedDict "
    "torch.Size torch.Tensor torch.device torch._tensor._rebuild_from_type_v2 torch.nn.parameter.Parameter "
    "torch.serialization._get_layout torch.storage.TypedStorage torch.storage.UntypedStorage".split()
)
_TORCH_DTYPE_NAMES = frozenset(
    "bfloat16 bits16 bits1x8 bits2x4 bits4x2 bits8 bool complex128 complex32 complex64 float16 float32 float64 "
    "float4_e2m1fn_x2 float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu int1 int16 int2 int3 "
    "int32 int4 int5 int6 int64 int7 int8 qint32 qint8 quint2x4 quint4x2 quint8 uint1 uint16 uint2 uint3 uint32 uint4 "
    "uint5 uint6 uint64 uint7 uint8 per_channel_affine per_channel_affine_float_qparams per_channel_symmetric "
    "per_tensor_affine per_tensor_symmetric sparse_coo sparse_csr sparse_csc sparse_bsr sparse_bsc strided _mkldnn".split()
)


def torch_allows(path: str) -> bool:
    """Whether torch.load(weights_only=True) would accept this global."""
    if path in _TORCH_SAFE:
        return True
    module, _, name = path.rpartition(".")
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return True
    if module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse") and name.endswith(("Storage", "Tensor")):
        return True
    return module == "torch" and name in _TORCH_DTYPE_NAMES


# --------------------------------------------------------------------------- stand-ins: pure constructors

_FLAT = (str, bytes, int, float, bool, type(None), complex, Global, Instance)


def _flat_key(key: Any) -> bool:
    """Only values whose hash costs O(their own size) may be hashed: atoms, records, short tuples of those."""
    if isinstance(key, _FLAT):
        return True
    if type(key) is tuple and len(key) <= 64:
        return all(isinstance(k, _FLAT) or (type(k) is tuple and len(k) <= 64 and all(isinstance(j, _FLAT) for j in k))
                   for k in key)
    return isinstance(key, frozenset) and getattr(key, "_bncli_flat", False)


class _Frozen(frozenset):
    """A frozenset the machine built from flat members (so it may itself be hashed)."""

    _bncli_flat = True


class Machine:
    """One load's pickle machine. `persistent_load` resolves storage ids (the format reader's job)."""

    def __init__(self, budget: Budget, persistent_load: Callable[[Any], Any] | None = None, encoding: str = "utf-8") -> None:
        self.budget = budget
        self.persistent_load = persistent_load
        self.encoding = encoding
        self.globals_seen: dict[str, Global] = {}  # every global named, in first-seen order (for BN012)
        self.calls: dict[str, int] = {}  # globals called (REDUCE/NEWOBJ/INST/OBJ) and how often
        self._size: dict[int, int] = {}  # id(container) -> items reachable from it, repeats counted
        self._keep: list[Any] = []  # keeps every sized container alive so that its id is never reused
        self._flat_ok: set[int] = set()  # ids of kept tuples already checked as flat keys
        from bncli.formats import stand_ins

        self._stand_ins = stand_ins.table(self)

    # ----------------------------------------------------------------- sizes of memo-built containers

    def size(self, obj: Any) -> int:
        return self._size.get(id(obj), 1)

    def _grow(self, container: Any, items) -> None:
        total = self._size.get(id(container))
        if total is None:
            total = 1
            self._keep.append(container)
        for item in items:
            total += 1 if item is container else self._size.get(id(item), 1)
        if total > MAX_EXPANDED_ITEMS:
            raise self.budget.refuse(
                f"its pickle builds a structure of more than {MAX_EXPANDED_ITEMS:,} items from shared references "
                "(a memo bomb); refused"
            )
        self._size[id(container)] = total

    def new_container(self, container: Any, items=()) -> Any:
        self._grow(container, items)
        return container

    def check_key(self, key: Any, what: str) -> None:
        if type(key) is tuple and id(key) in self._flat_ok:
            self.budget.ops(self._size.get(id(key), len(key)))  # hashing it again costs every item it holds
            return
        if not _flat_key(key):
            raise PickleError(f"{what} is a nested {type(key).__name__}; only flat values are hashed")
        if type(key) is tuple:
            self.budget.ops(len(key) + sum(len(k) for k in key if type(k) is tuple))
            if id(key) in self._size:  # kept alive by the machine: its id cannot be reused
                self._flat_ok.add(id(key))

    def frozen(self, items) -> frozenset:
        items = list(items)
        for item in items:
            self.check_key(item, "a set member")
        return self.new_container(_Frozen(items), items)

    # ----------------------------------------------------------------- the machine

    def load(self, data: bytes | io.BufferedIOBase) -> Any:
        """The object the pickle describes; reads from `data` up to and including its STOP opcode."""
        stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}
        budget = self.budget
        try:
            ops = pickletools.genops(stream)
            for op, arg, _pos in ops:
                budget.ops()
                name = op.name
                handler = _HANDLERS.get(name)
                if handler is None:
                    raise PickleError(f"pickle opcode {name} is not supported")
                if name == "STOP":
                    if len(stack) != 1 or marks:
                        raise PickleError("the pickle ends with a malformed stack")
                    return stack.pop()
                handler(self, stack, marks, memo, arg)
        except PickleError:
            raise
        except (IndexError, KeyError):
            raise PickleError("the pickle refers to values it never made (damaged)") from None
        except (ValueError, TypeError, EOFError, OverflowError, UnicodeDecodeError) as exc:
            if not stream.read(1):
                raise PickleError("its pickle is cut short (a truncated file?)") from None
            raise PickleError(f"damaged pickle ({_short(exc)})") from None
        raise PickleError("its pickle is cut short (a truncated file?)")

    # ----------------------------------------------------------------- calls

    def name_global(self, module: str, name: str) -> Any:
        if not (isinstance(module, str) and isinstance(name, str)):
            raise PickleError("a global whose name is not text")
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 spells Python 2 names (__builtin__.set)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        path = f"{module}.{name}"
        record = self.globals_seen.get(path)
        if record is None:
            record = self.globals_seen[path] = Global(module, name)
        return record

    def call(self, func: Any, args: Any, via: str, kwargs: Any = None) -> Any:
        if type(args) is not tuple:
            raise PickleError(f"{via} with arguments that are not a tuple")
        if isinstance(func, Global):
            self.calls[func.path] = self.calls.get(func.path, 0) + 1
            stand_in = self._stand_ins.get(func.path)
            if stand_in is not None and not kwargs:
                return stand_in(*args)
            if torch_allows(func.path):
                # torch builds something real from this call (torch.FloatTensor([...]), a storage...): bncli
                # does not model it, so its values are unreadable rather than silently absent
                from bncli.formats.tensors import OpaqueTensor

                return OpaqueTensor(f"a value built by {func.path}()")
        elif not isinstance(func, Instance):
            raise PickleError(f"{via} on a {type(func).__name__}, which is not callable")
        return self.new_container(Instance(func, args, via, kwargs), args)

    def build(self, inst: Any, state: Any) -> None:
        if isinstance(inst, Instance):
            if isinstance(inst.state, dict) and isinstance(state, dict):
                inst.state.update(state)
            else:
                inst.state = state
            self._grow(inst, (state,))
            return
        if type(inst) is OrderedDict and isinstance(state, dict) and set(state) <= {"_metadata"}:
            return  # the per-module versions torch puts on a state dict: not needed, not stored
        raise PickleError(f"BUILD on a {_kind(inst)}: only objects the pickle created may receive state")


def _kind(obj: Any) -> str:
    if isinstance(obj, Global):
        return f"global ({obj.path})"
    return type(obj).__name__


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


# --------------------------------------------------------------------------- opcode handlers


def _pop_mark(stack: list, marks: list) -> list:
    if not marks:
        raise PickleError("the pickle pops a mark it never set (damaged)")
    at = marks.pop()
    items = stack[at:]
    del stack[at:]
    return items


def _push(value):
    def handler(m, stack, marks, memo, arg):
        stack.append(value() if callable(value) else value)

    return handler


def _push_arg(m, stack, marks, memo, arg):
    stack.append(arg)


def _push_string(m, stack, marks, memo, arg):
    # pickletools decodes STRING/BINSTRING as latin-1; torch.load decodes them with its encoding (utf-8)
    raw = arg.encode("latin-1") if isinstance(arg, str) else arg
    stack.append(raw if m.encoding == "bytes" else raw.decode(m.encoding, "strict"))


def _push_bytearray(m, stack, marks, memo, arg):
    stack.append(bytearray(arg))


def _mark(m, stack, marks, memo, arg):
    marks.append(len(stack))


def _pop(m, stack, marks, memo, arg):
    if marks and marks[-1] == len(stack):
        marks.pop()  # POP of an empty mark frame discards the mark, as pickle does
    else:
        stack.pop()


def _pop_mark_op(m, stack, marks, memo, arg):
    _pop_mark(stack, marks)


def _dup(m, stack, marks, memo, arg):
    stack.append(stack[-1])


def _get(m, stack, marks, memo, arg):
    stack.append(memo[arg])


def _put(m, stack, marks, memo, arg):
    if arg < 0:
        raise PickleError("negative memo index")
    memo[arg] = stack[-1]


def _memoize(m, stack, marks, memo, arg):
    memo[len(memo)] = stack[-1]


def _empty_list(m, stack, marks, memo, arg):
    stack.append(m.new_container([]))


def _empty_dict(m, stack, marks, memo, arg):
    stack.append(m.new_container({}))


def _empty_set(m, stack, marks, memo, arg):
    stack.append(m.new_container(set()))


def _empty_tuple(m, stack, marks, memo, arg):
    stack.append(())


def _tuple(m, stack, marks, memo, arg):
    items = _pop_mark(stack, marks)
    stack.append(m.new_container(tuple(items), items))


def _tuple_n(n):
    def handler(m, stack, marks, memo, arg):
        if len(stack) < n or (marks and marks[-1] > len(stack) - n):
            raise PickleError("the pickle builds a tuple from values it never made (damaged)")
        items = stack[-n:]
        del stack[-n:]
        stack.append(m.new_container(tuple(items), items))

    return handler


def _list(m, stack, marks, memo, arg):
    items = _pop_mark(stack, marks)
    stack.append(m.new_container(items, items))


def _dict(m, stack, marks, memo, arg):
    items = _pop_mark(stack, marks)
    stack.append(m.new_container({}))
    _set_items(m, stack[-1], items)


def _frozenset(m, stack, marks, memo, arg):
    stack.append(m.frozen(_pop_mark(stack, marks)))


def _append(m, stack, marks, memo, arg):
    item = stack.pop()
    _extend(m, stack[-1], [item])


def _appends(m, stack, marks, memo, arg):
    items = _pop_mark(stack, marks)
    _extend(m, stack[-1], items)


def _extend(m, target, items) -> None:
    if type(target) is list:
        m._grow(target, items)
        target.extend(items)
    elif isinstance(target, Instance):
        if target.items is None:
            target.items = []
        m._grow(target, items)
        target.items.extend(items)
    else:
        raise PickleError(f"APPEND to a {_kind(target)}")


def _setitem(m, stack, marks, memo, arg):
    value = stack.pop()
    key = stack.pop()
    _set_items(m, stack[-1], [key, value])


def _setitems(m, stack, marks, memo, arg):
    items = _pop_mark(stack, marks)
    _set_items(m, stack[-1], items)


def _set_items(m, target, items) -> None:
    if len(items) % 2:
        raise PickleError("SETITEMS with a key and no value (damaged)")
    if type(target) in (dict, OrderedDict, Counter):
        m._grow(target, items)
        for i in range(0, len(items), 2):
            m.check_key(items[i], "a dictionary key")
            target[items[i]] = items[i + 1]
    elif isinstance(target, Instance):
        if target.dictitems is None:
            target.dictitems = []
        m._grow(target, items)
        target.dictitems.extend(zip(items[::2], items[1::2], strict=True))
    else:
        raise PickleError(f"SETITEM on a {_kind(target)}")


def _additems(m, stack, marks, memo, arg):
    items = _pop_mark(stack, marks)
    target = stack[-1]
    if type(target) is set:
        for item in items:
            m.check_key(item, "a set member")
        m._grow(target, items)
        target.update(items)
    elif isinstance(target, Instance):
        _extend(m, target, items)
    else:
        raise PickleError(f"ADDITEMS to a {_kind(target)}")


def _global(m, stack, marks, memo, arg):
    module, _, name = arg.partition(" ")
    stack.append(m.name_global(module, name))


def _stack_global(m, stack, marks, memo, arg):
    name = stack.pop()
    module = stack.pop()
    stack.append(m.name_global(module, name))


def _reduce(m, stack, marks, memo, arg):
    args = stack.pop()
    func = stack.pop()
    stack.append(m.call(func, args, "REDUCE"))


def _newobj(m, stack, marks, memo, arg):
    args = stack.pop()
    cls = stack.pop()
    stack.append(m.call(cls, args, "NEWOBJ"))


def _newobj_ex(m, stack, marks, memo, arg):
    kwargs = stack.pop()
    args = stack.pop()
    cls = stack.pop()
    if type(kwargs) is not dict:
        raise PickleError("NEWOBJ_EX with keyword arguments that are not a dict")
    stack.append(m.call(cls, args, "NEWOBJ_EX", kwargs or None))


def _inst(m, stack, marks, memo, arg):
    module, _, name = arg.partition(" ")
    args = tuple(_pop_mark(stack, marks))
    stack.append(m.call(m.name_global(module, name), args, "INST"))


def _obj(m, stack, marks, memo, arg):
    items = _pop_mark(stack, marks)
    if not items:
        raise PickleError("OBJ without a class (damaged)")
    stack.append(m.call(items[0], tuple(items[1:]), "OBJ"))


def _build(m, stack, marks, memo, arg):
    state = stack.pop()
    m.build(stack[-1], state)


def _binpersid(m, stack, marks, memo, arg):
    pid = stack.pop()
    if m.persistent_load is None:
        raise PickleError("a persistent id where none is expected")
    stack.append(m.persistent_load(pid))


def _persid_text(m, stack, marks, memo, arg):
    if m.persistent_load is None:
        raise PickleError("a persistent id where none is expected")
    stack.append(m.persistent_load(arg))


def _proto(m, stack, marks, memo, arg):
    if not 0 <= arg <= 5:
        raise PickleError(f"unknown pickle protocol {arg}")


def _nothing(m, stack, marks, memo, arg):
    pass


def _refuse(what):
    def handler(m, stack, marks, memo, arg):
        raise PickleError(what)

    return handler


_HANDLERS: dict[str, Callable] = {
    "INT": _push_arg, "BININT": _push_arg, "BININT1": _push_arg, "BININT2": _push_arg,
    "LONG": _push_arg, "LONG1": _push_arg, "LONG4": _push_arg,
    "STRING": _push_string, "BINSTRING": _push_string, "SHORT_BINSTRING": _push_string,
    "BINBYTES": _push_arg, "SHORT_BINBYTES": _push_arg, "BINBYTES8": _push_arg, "BYTEARRAY8": _push_bytearray,
    "NONE": _push(None), "NEWTRUE": _push(True), "NEWFALSE": _push(False),
    "UNICODE": _push_arg, "SHORT_BINUNICODE": _push_arg, "BINUNICODE": _push_arg, "BINUNICODE8": _push_arg,
    "FLOAT": _push_arg, "BINFLOAT": _push_arg,
    "EMPTY_LIST": _empty_list, "APPEND": _append, "APPENDS": _appends, "LIST": _list,
    "EMPTY_TUPLE": _empty_tuple, "TUPLE": _tuple, "TUPLE1": _tuple_n(1), "TUPLE2": _tuple_n(2), "TUPLE3": _tuple_n(3),
    "EMPTY_DICT": _empty_dict, "DICT": _dict, "SETITEM": _setitem, "SETITEMS": _setitems,
    "EMPTY_SET": _empty_set, "ADDITEMS": _additems, "FROZENSET": _frozenset,
    "POP": _pop, "DUP": _dup, "MARK": _mark, "POP_MARK": _pop_mark_op,
    "GET": _get, "BINGET": _get, "LONG_BINGET": _get, "PUT": _put, "BINPUT": _put, "LONG_BINPUT": _put,
    "MEMOIZE": _memoize,
    "EXT1": _refuse("pickle extension codes (EXT1/2/4) are not supported"),
    "EXT2": _refuse("pickle extension codes (EXT1/2/4) are not supported"),
    "EXT4": _refuse("pickle extension codes (EXT1/2/4) are not supported"),
    "NEXT_BUFFER": _refuse("out-of-band pickle buffers are not supported"),
    "READONLY_BUFFER": _refuse("out-of-band pickle buffers are not supported"),
    "GLOBAL": _global, "STACK_GLOBAL": _stack_global,
    "REDUCE": _reduce, "BUILD": _build, "INST": _inst, "OBJ": _obj, "NEWOBJ": _newobj, "NEWOBJ_EX": _newobj_ex,
    "PROTO": _proto, "STOP": _nothing, "FRAME": _nothing,
    "PERSID": _persid_text, "BINPERSID": _binpersid,
}
