"""How many optimizer steps a training checkpoint says it took (Lightning's `global_step`, an optimizer state's
`step`), read from the container around the state dict; every value is file data, so only a plain non-negative
integer (or a 1-element tensor holding one) counts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Where training scripts keep the optimizer's state_dict() beside the model.
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim", "opt")
MAX_STEPS = 2**53  # anything above is no step count (and would not round-trip through a float)
MAX_PARAMS = 4096  # optimizer states looked at: the first ones are enough, a hostile file may hold millions


def optimizer_steps(obj: Any) -> int | None:
    """The optimizer steps recorded in a checkpoint's top-level mapping, or None where it says nothing."""
    if not isinstance(obj, Mapping):
        return None
    steps = _integer(obj.get("global_step"))
    if steps is not None:
        return steps
    states = [obj.get(key) for key in OPTIMIZER_KEYS]
    lightning = obj.get("optimizer_states")
    if isinstance(lightning, (list, tuple)) and lightning:
        states.append(lightning[0])
    for state in states:
        steps = _state_steps(state)
        if steps is not None:
            return steps
    return None


def _state_steps(optimizer: Any) -> int | None:
    """The largest `step` of an optimizer state_dict's per-parameter states (Adam, AdamW, RMSprop... keep one)."""
    if not isinstance(optimizer, Mapping) or not isinstance(optimizer.get("state"), Mapping):
        return None
    found = None
    for i, per_param in enumerate(optimizer["state"].values()):
        if i >= MAX_PARAMS:
            break
        if isinstance(per_param, Mapping):
            step = _integer(per_param.get("step"))
            if step is not None:
                found = step if found is None else max(found, step)
    return found


def _integer(value: Any) -> int | None:
    """A non-negative whole number: an int, a whole float, or a 1-element tensor of one (torch stores Adam's step
    as a float32 0-d tensor)."""
    if isinstance(value, bool) or value is None:
        return None
    if not isinstance(value, (int, float)):
        size = getattr(value, "numel", None)
        if not callable(size) or getattr(value, "shape", None) is None:
            return None
        try:
            if size() != 1:
                return None
            value = value.numpy().reshape(()).item()
        except Exception:  # noqa: BLE001 - an unreadable value says nothing about steps
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
    if value != value or not 0 <= value <= MAX_STEPS or value != int(value):
        return None
    return int(value)
