"""The Python API: `bncli.inspect`, `bncli.diff`, `bncli.recalibrate` (the same cores the commands call) and
`bncli.watch` (a model while it trains).

`import bncli` stays cheap (no torch, numpy or Rich): the package resolves these names on first use.
`bncli.diff`, `bncli.recalibrate` and `bncli.watch` are also the names of core modules; those modules are callable
(callable_module below), so `bncli.diff(a, b)` works whichever of the two Python's import system put there.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bncli.diff import DiffReport
    from bncli.report import InspectReport

Paths = "str | os.PathLike | Iterable[str | os.PathLike]"


def inspect(
    paths,
    *,
    layer: str | None = None,
    state: str | None = None,
    strip_prefix: str | None = None,
    select: Iterable[str] | str | None = None,
    ignore: Iterable[str] | str | None = None,
    require_bn: bool = False,
    **thresholds: float | None,
) -> InspectReport:
    """Audit checkpoints as `bncli inspect` does and return its report (`.to_json()`, `.findings`, `.worst()`).

    `paths`: one path or several (files, directories, glob patterns). The thresholds are the options' names with
    underscores: eps, min_var, max_var, max_mean, dead_weight, max_fold_spread. An unreadable input is a FileReport
    with `error` set, as on the command line. [tool.bncli] is not read: pass the settings you mean.
    """
    from bncli.audit import expand_inputs, inspect_files
    from bncli.config import Config, resolve_inspect

    options: dict[str, Any] = {"select": _listify(select), "ignore": _listify(ignore), "require-bn": require_bn}
    for name, value in thresholds.items():
        key = name.replace("_", "-")
        if key not in {"eps", "min-var", "max-var", "max-mean", "dead-weight", "max-fold-spread"}:
            raise TypeError(f"inspect() got an unexpected keyword argument {name!r}")
        options[key] = value
    settings = resolve_inspect(options, Config())
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return inspect_files(
        expand_inputs(list(paths)),
        layer=layer,
        state=state,
        thresholds=settings.thresholds,
        selected=settings.selected,
        require_bn=settings.require_bn,
        strip_prefix=strip_prefix,
    )


def diff(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    layer: str | None = None,
    only: Iterable[str] | str = (),
    exclude: Iterable[str] | str = (),
    atol: float = 0.0,
    rtol: float = 0.0,
    eps: float = 1e-5,
    state: str | None = None,
    state_a: str | None = None,
    state_b: str | None = None,
    strip_prefix: str | None = None,
    strip_prefix_a: str | None = None,
    strip_prefix_b: str | None = None,
    fail_on_change: bool = False,
    fail_if_unchanged: bool = False,
) -> DiffReport:
    """Compare two checkpoints as `bncli diff` does and return its report (`.to_json()`, `.layers`, `.changed`,
    `.unchanged`; with a gate, `.failed` and `.violations`). The options are the command's, with underscores."""
    from bncli.diff import FAIL_IF_UNCHANGED, FAIL_ON_CHANGE, diff_files
    from bncli.errors import UsageError

    if fail_on_change and fail_if_unchanged:
        raise UsageError("--fail-on-change and --fail-if-unchanged cannot be used together")
    if strip_prefix is not None:
        if strip_prefix_a is not None or strip_prefix_b is not None:
            raise UsageError("--strip-prefix applies to both files: use it without --strip-prefix-a/--strip-prefix-b")
        strip_prefix_a = strip_prefix_b = strip_prefix
    if not (eps >= 0 and eps != float("inf")):
        raise UsageError(f"eps must be a finite number >= 0; got {eps!r}")
    gate = FAIL_ON_CHANGE if fail_on_change else FAIL_IF_UNCHANGED if fail_if_unchanged else None
    return diff_files(
        a, b, layer=layer, eps=eps, state=state, state_a=state_a, state_b=state_b, strip_prefix_a=strip_prefix_a,
        strip_prefix_b=strip_prefix_b, only=_listify(only) or (), exclude=_listify(exclude) or (), atol=atol,
        rtol=rtol, gate=gate,
    )  # fmt: skip


def recalibrate(
    model,
    batches: Iterable[Any],
    forward: Callable[[Any, Any], Any] | None = None,
    layers: Iterable[str] | str | None = None,
) -> DiffReport:
    """Re-estimate the running statistics of a live model's BatchNorm layers in place, exactly as `bncli
    recalibrate` does, and return the drift: a DiffReport of each layer before (A) and after (B).

    `batches`: any iterable (a DataLoader...). `forward(model, batch)` runs one batch; by default `model(batch)`,
    or `model(batch[0])` for a tuple or list, with the tensor moved to the model's device and dtype. `layers`:
    glob(s) of the BatchNorm layers to re-estimate (default all); the others keep their statistics and stay in
    eval mode. Each re-estimated layer gets the float64 mean and unbiased variance of every value that reached it,
    and num_batches_tracked grows by the number of batches; a layer no input reached is left as it was. The
    model's train/eval modes are restored afterwards.
    """
    import torch

    from bncli.diff import diff_layers
    from bncli.recalibrate import population_moments, select_modules

    chosen = select_modules(model, layers, option="layers")
    before = [_module_layer(name, m) for name, m in chosen]
    saved = {name: {k: v.detach().clone() for k, v in m.named_buffers(recurse=False)} for name, m in chosen}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        moments, count = population_moments(model, batches, device, forward=forward, layers=chosen)
    finally:
        with torch.no_grad():  # the forward passes moved the buffers by momentum: put them back first
            for name, m in chosen:
                for k, v in m.named_buffers(recurse=False):
                    v.copy_(saved[name][k])
    with torch.no_grad():
        for name, m in chosen:
            mom = moments[name]
            if mom.count == 0:
                continue
            m.running_mean.copy_(mom.mean.to(m.running_mean.dtype))
            m.running_var.copy_(mom.var.to(m.running_var.dtype))
            if getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.add_(count)
    after = [_module_layer(name, m) for name, m in chosen]
    return diff_layers(before, after, path_a="before", path_b="after")


def watch(model, optimizer=None, *, on_defect="raise", every: int = 1):
    """Watch a live model's BatchNorm layers while it trains, and name the step and the layer where they go
    wrong (docs/watch.md). Returns a handle that is also a context manager; `.close()` removes every hook.

    Events (rules BN001/BN002 live, BN017, BN018, BN019): `on_defect="raise"` raises a `bncli.BatchNormDefect`
    for BN001/BN002 and warns (`bncli.BatchNormWarning`) for the others; `"warn"` warns for all; a callable
    receives every event. `optimizer`: its steps number the events and mark the steps for BN017 (without it,
    the model's forwards do). `every`: with 1 each update is checked at once (the event names the input channel);
    with N the check stays on the device and is read every N steps (no synchronization per step on CUDA).
    """
    from bncli.watch import Watch

    return Watch(model, optimizer, on_defect=on_defect, every=every)


def _module_layer(name: str, module):
    """A BNLayer of a live module's buffers and parameters (copies, on the CPU)."""
    import torch

    from bncli.layers import BNLayer

    def array(t):
        if t is None:
            return None
        t = t.detach().cpu()
        return (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).numpy().copy()

    nbt = getattr(module, "num_batches_tracked", None)
    return BNLayer(
        name=name,
        running_mean=array(module.running_mean),
        running_var=array(module.running_var),
        weight=array(module.weight),
        bias=array(module.bias),
        num_batches_tracked=None if nbt is None else int(nbt),
        dtype=str(module.running_var.dtype).removeprefix("torch."),
    )


def _listify(value):
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class _CallableModule(types.ModuleType):
    """A module that can be called: `bncli.diff(a, b)` even once the core module bncli.diff is imported."""

    def __call__(self, *args, **kwargs):
        return getattr(sys.modules[__name__], self.__dict__["__api__"])(*args, **kwargs)


def callable_module(module_name: str, api_name: str) -> None:
    """Make the module `module_name` callable as the API function `api_name` of this module."""
    module = sys.modules[module_name]
    module.__api__ = api_name
    module.__class__ = _CallableModule
