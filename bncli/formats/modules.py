"""Whole pickled models read as data: an nn.Module record tree to the flat state dict torch's state_dict() would
give, and each BatchNorm layer's class, eps, momentum, affine and track_running_stats from its pickled state."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from bncli.budget import AMPLIFICATION_FLOOR, MAX_DEPTH, MAX_ENTRIES
from bncli.formats.pickle_vm import Instance
from bncli.formats.tensors import LazyTensor, OpaqueTensor

_MODULE_KEYS = ("_modules", "_parameters", "_buffers")


@dataclass(frozen=True)
class LayerMeta:
    """What a whole pickled model says of one BatchNorm module (None where its state does not say)."""

    class_path: str | None
    eps: float | None
    momentum: float | None  # None in the file means a cumulative average; see momentum_given
    momentum_given: bool
    affine: bool | None
    track_running_stats: bool | None


def module_state(obj: Any) -> dict | None:
    """The state of an nn.Module record (the module's __dict__ as pickled), or None for anything else."""
    if not isinstance(obj, Instance):
        return None
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]  # (dict, slots) as pickle's default __reduce_ex__ writes for classes with __slots__
    if isinstance(state, dict) and any(k in state for k in _MODULE_KEYS):
        return state
    return None


def is_module(obj: Any) -> bool:
    return module_state(obj) is not None


def _walk_modules(root: Instance):
    """(name, record, state) in the order torch's state_dict() visits modules: pre-order, children in _modules
    order. A module reachable twice (shared) is visited under each name, as state_dict() does; a module that
    contains itself (a cycle, which state_dict() would follow forever) is not entered again below itself. The
    number of names is bounded (budget.MAX_ENTRIES) so that a DAG of shared modules cannot expand exponentially."""
    stack: list[tuple[str, Any, frozenset]] = [("", root, frozenset())]
    visited = 0
    while stack:
        name, node, above = stack.pop()
        state = module_state(node)
        if state is None or id(node) in above:
            continue
        visited += 1
        if visited > MAX_ENTRIES or len(above) > MAX_DEPTH:
            raise ModelTooLarge(f"its pickled model names more than {MAX_ENTRIES:,} modules (or nests them deeper than {MAX_DEPTH})")
        yield name, node, state
        children = state.get("_modules")
        if isinstance(children, dict):
            here = above | {id(node)}
            kids = [(f"{name}.{k}" if name else str(k), v, here) for k, v in children.items() if isinstance(k, str) and v is not None]
            strange = next((k for k, v, _ in kids if module_state(v) is None), None)
            if strange is not None:  # its statistics would be invisible: refused rather than skipped
                raise ModelRefused(f"submodule {strange!r} is not a module bncli can read (it pickles no module state)")
            stack.extend(reversed(kids))


class ModelTooLarge(Exception):
    """A module tree beyond the budget, or one that cannot be read faithfully: the reader turns it into an
    InputError naming the file."""


class ModelRefused(ModelTooLarge):
    """A module tree whose pickled state would make the loaded model differ from what bncli reads."""


def _tensor(value: Any) -> bool:
    return isinstance(value, (LazyTensor, OpaqueTensor))


def flatten(root: Instance) -> tuple[OrderedDict, dict[str, LayerMeta], str | None]:
    """The state dict of a module record, the BatchNorm modules' metadata by module name, and the root's class."""
    flat: OrderedDict[str, Any] = OrderedDict()
    meta: dict[str, LayerMeta] = {}
    key_bytes = 0
    for name, node, state in _walk_modules(root):
        prefix = f"{name}." if name else ""
        where = name or "<root>"
        fields = []
        for field in ("_parameters", "_buffers", "_modules"):
            value = state.get(field, {})
            # nn.Module keeps these in plain dicts with string keys; anything else is a module torch would run
            # differently from how it reads (an int key in _modules still runs in forward)
            if type(value) not in (dict, OrderedDict) or not all(isinstance(k, str) for k in value):
                raise ModelRefused(f"module {where!r} has a {field} that is not a mapping of names, as nn.Module keeps it")
            fields.append(value)
        params, buffers, children = fields
        names = [*params, *buffers, *children]
        # A name in two of them, or an attribute in the module's __dict__ of the same name: Python's attribute
        # lookup would find another object than state_dict() names. No real module pickles that: refused.
        twice = sorted({n for n in names if names.count(n) > 1} | {n for n in names if n in state})
        if twice:
            raise ModelRefused(
                f"module {where!r} has an attribute that shadows its {twice[0]!r} (the model would use "
                "another object than state_dict() names)"
            )
        # Every parameter and buffer, non-persistent ones too: a whole model runs with them. A value that is not
        # a tensor bncli reads (a record of a call) is kept as an unreadable tensor, never silently dropped.
        for key, value in [*params.items(), *buffers.items()]:
            if value is None:
                continue
            flat[prefix + key] = value if _tensor(value) else OpaqueTensor(f"a value built by {_built_by(value)}")
            key_bytes += len(prefix) + len(key)
        if len(flat) > MAX_ENTRIES or key_bytes > AMPLIFICATION_FLOOR:
            raise ModelTooLarge(f"its pickled model names more than {MAX_ENTRIES:,} tensors (or {AMPLIFICATION_FLOOR:,} bytes of names)")
        if _tensor(buffers.get("running_mean")) and _tensor(buffers.get("running_var")):
            eps = _number(state, "eps", where)
            if "eps" in state and (eps is None or not (eps >= 0 and eps != float("inf"))):
                raise ModelRefused(f"module {where!r} has eps {_brief(state['eps'])}; torch needs a finite number >= 0")
            momentum = _number(state, "momentum", where)
            if state.get("momentum") is not None and (momentum is None or momentum != momentum):
                raise ModelRefused(f"module {where!r} has momentum {_brief(state['momentum'])}; torch needs a number or None")
            meta[name] = LayerMeta(
                class_path=node.class_path,
                eps=eps,
                momentum=momentum,
                momentum_given="momentum" in state,
                affine=_bool(state.get("affine")),
                track_running_stats=_bool(state.get("track_running_stats")),
            )
    return flat, meta, root.class_path


def _number(state: dict, key: str, where: str) -> float | None:
    value = state.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ModelRefused(f"module {where!r} has {key} {_brief(value)}, beyond any float") from None
    return None


def _brief(value: Any) -> str:
    """A value from the file in a few words (never a huge integer converted to text)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if value.bit_length() < 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, (float, bool)) or value is None:
        return repr(value)
    if isinstance(value, str):
        return repr(value[:40])
    return f"a {type(value).__name__}"


def _built_by(value: Any) -> str:
    if isinstance(value, Instance):
        return f"{value.class_path or 'a pickled call'}()"
    return f"a {type(value).__name__}"


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None
