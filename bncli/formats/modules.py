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
    if isinstance(state, dict) and any(isinstance(state.get(k), dict) for k in _MODULE_KEYS):
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
        params = state.get("_parameters") if isinstance(state.get("_parameters"), dict) else {}
        buffers = state.get("_buffers") if isinstance(state.get("_buffers"), dict) else {}
        children = state.get("_modules") if isinstance(state.get("_modules"), dict) else {}
        # An attribute in the module's __dict__ is found before nn.Module.__getattr__ looks in _buffers: the model
        # would run with it, not with the buffer. No real module pickles both: refused.
        shadowed = sorted(k for k in (*params, *buffers, *children) if isinstance(k, str) and k in state)
        if shadowed:
            raise ModelRefused(
                f"module {name or '<root>'!r} has an attribute that shadows its {shadowed[0]!r} (the model would use "
                "the attribute, state_dict() the buffer)"
            )
        hidden = state.get("_non_persistent_buffers_set")
        hidden = set(hidden) if isinstance(hidden, (set, frozenset, list, tuple)) else set()
        # Non-persistent buffers are left out of state_dict(), but a whole model runs with them: BatchNorm's
        # statistics are audited whether persistent or not.
        hidden -= {"running_mean", "running_var", "num_batches_tracked"}
        for key, value in [*params.items(), *buffers.items()]:
            if isinstance(key, str) and _tensor(value) and not (key in hidden and key in buffers):
                flat[prefix + key] = value
                key_bytes += len(prefix) + len(key)
        if len(flat) > MAX_ENTRIES or key_bytes > AMPLIFICATION_FLOOR:
            raise ModelTooLarge(f"its pickled model names more than {MAX_ENTRIES:,} tensors (or {AMPLIFICATION_FLOOR:,} bytes of names)")
        if _tensor(buffers.get("running_mean")) and _tensor(buffers.get("running_var")):
            meta[name] = LayerMeta(
                class_path=node.class_path,
                eps=_number(state.get("eps")),
                momentum=_number(state.get("momentum")),
                momentum_given="momentum" in state,
                affine=_bool(state.get("affine")),
                track_running_stats=_bool(state.get("track_running_stats")),
            )
    return flat, meta, root.class_path


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None
