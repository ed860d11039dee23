"""`bncli.watch`: BatchNorm defects named at the step and the layer where they happen, while a model trains.

The watch hooks every BatchNorm layer (any module with `running_mean` and `running_var` buffers) and the model,
and, when given, the optimizer's step. It reads the layers' C-element buffers after each update, never the
activations, except on the forward that turns a buffer bad (then the layer's input, to say which channel held the
NaN or Inf). With `every=1` each update is checked at once; with `every=N` the check stays on the tensors' device
(a flag and the first bad step) and is looked at every N steps, so that CUDA training is not synchronized per step.

Rules (bncli/rules.py, scope "live"): BN001/BN002 live, BN017 repeated-update, BN018 update-without-grad, BN019
not-updating. Steps are counted from 0, as Lightning's global_step: the optimizer steps taken before the forward
(without an optimizer: the model's forwards before this one).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bncli.report import InspectReport, Severity

DEFECTS = ("BN001", "BN002")  # follow on_defect; the other events warn unless on_defect is a callable
ON_DEFECT = ("raise", "warn")


@dataclass(frozen=True)
class BatchNormEvent:
    """One thing the watch saw: a rule of the catalogue, the layer, the step, and what happened."""

    rule: str
    name: str
    severity: Severity
    layer: str | None
    step: int
    message: str
    channels: tuple[int, ...] = ()  # the layer's channels concerned (BN001/BN002)
    layers: tuple[str, ...] = ()  # every layer of the event (BN018, BN019 group them)

    def __str__(self) -> str:
        where = f" {self.layer}" if self.layer is not None else ""
        return f"{self.severity.value:<7} {self.rule} {self.name}{where}: {self.message}"


class _EventAttributes:
    """`.event` and its fields (`.rule`, `.layer`, `.step`, `.message`...) on the exception and the warning."""

    def _set(self, event: BatchNormEvent) -> None:
        self.event = event
        for name in ("rule", "name", "severity", "layer", "step", "message", "channels", "layers"):
            setattr(self, name, getattr(event, name))


class BatchNormDefect(_EventAttributes, Exception):
    """Raised by `bncli.watch(..., on_defect="raise")` at the forward that made running statistics non-finite or
    negative (BN001/BN002)."""

    def __init__(self, event: BatchNormEvent) -> None:
        super().__init__(str(event))
        self._set(event)


class BatchNormWarning(_EventAttributes, UserWarning):
    """Warned by `bncli.watch` for each event it does not raise."""

    def __init__(self, event: BatchNormEvent) -> None:
        super().__init__(str(event))
        self._set(event)


@dataclass(frozen=True)
class WatchReport(InspectReport):
    """`bncli.inspect`'s report of the live model (one FileReport, format "memory"), plus the events seen."""

    events: tuple[BatchNormEvent, ...] = ()


def _rule(rule_id: str):
    from bncli.rules import rule_by_key

    return rule_by_key(rule_id)


def _show(items, limit: int = 8) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


@dataclass
class _Layer:
    name: str
    module: Any
    kind: str  # "norm": torch's _NormBase (updates when training and tracking); "counted": a num_batches_tracked
    # buffer shows the updates; "static": neither (a frozen class): checked by report(), never counted
    version: int = -1  # num_batches_tracked._version before the forward ("counted")
    updates_in_step: int = 0
    updates: int = 0
    reported: set = field(default_factory=set)
    flag: Any = None  # on the buffers' device: any bad value since the last look (every > 1)
    first: Any = None  # on the device: the first step a bad value was seen, -1 for none

    @property
    def can_update(self) -> bool:
        if self.kind == "norm":
            return bool(getattr(self.module, "track_running_stats", True)) and self.module.running_mean is not None
        return self.kind == "counted"


def _is_batchnorm(module) -> bool:
    import torch

    buffers = module._buffers
    return isinstance(buffers.get("running_mean"), torch.Tensor) and isinstance(buffers.get("running_var"), torch.Tensor)


class Watch:
    """What `bncli.watch` returns: hooks on the model's BatchNorm layers, removed by `.close()` (or the end of
    `with`); `.events` so far, `.report()` for an audit of the live model."""

    def __init__(self, model, optimizer=None, *, on_defect: str | Callable[[BatchNormEvent], Any] = "raise",
                 every: int = 1) -> None:
        import torch

        if not (callable(on_defect) or on_defect in ON_DEFECT):
            raise ValueError(f"on_defect must be 'raise', 'warn' or a callable; got {on_defect!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1; got {every!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"bncli.watch needs a torch.nn.Module; got {type(model).__name__}")
        self.model, self.optimizer = model, optimizer
        self.on_defect, self.every = on_defect, every
        self.events: list[BatchNormEvent] = []
        self.step = 0  # optimizer steps taken, or model forwards without an optimizer
        self.steps_with_updates = 0  # steps in which some layer updated (BN019 names them)
        self._last_update_step = -1
        self._forwards_in_step = 0  # forwards of the model since the last optimizer step
        self._depth = 0  # > 0 inside a forward of the model
        self._grad_at_forward = True  # torch.is_grad_enabled() when the model's forward began
        self._no_grad: list[str] = []  # layers updated without gradients in this forward of the model (BN018)
        self._no_grad_seen: set[frozenset] = set()
        self._step_tensors: dict[Any, Any] = {}  # device -> the current step, kept there (every > 1)
        self._defect_step = -1  # the step of the last BN001/BN002 event
        self._closed = False
        self._handles: list[Any] = []
        self.layers = {}
        for name, module in model.named_modules():
            if not _is_batchnorm(module):
                continue
            if isinstance(module, torch.nn.modules.batchnorm._NormBase):
                kind = "norm"
            elif isinstance(module._buffers.get("num_batches_tracked"), torch.Tensor):
                kind = "counted"
            else:
                kind = "static"
            layer = self.layers[name] = _Layer(name, module, kind)
            if kind != "static":
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(layer)))
                self._handles.append(module.register_forward_hook(self._post_hook(layer), always_call=False))
        self._handles.append(model.register_forward_pre_hook(self._model_pre))
        self._handles.append(model.register_forward_hook(self._model_post, always_call=True))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(self._optimizer_step))

    # ---- the context manager and its end ------------------------------------------------------------------------

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(summary=exc_type is None)

    def close(self, summary: bool = True) -> None:
        """Look at the flags a last time, report the layers that never updated (BN019), remove every hook."""
        if self._closed:
            return
        try:
            if summary:
                self._look()
                self._not_updating()
        finally:
            self._closed = True
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def report(self) -> WatchReport:
        """The audit `bncli.inspect` makes of the model as it is now (its state_dict(), each layer's own eps),
        plus every event seen so far."""
        from bncli.audit import audit_checkpoint
        from bncli.formats.modules import LayerMeta
        from bncli.layers import ROOT
        from bncli.loading import Checkpoint

        if not self._closed:
            self._look()
        meta = {}
        for name, layer in self.layers.items():
            m = layer.module
            meta[name or ROOT] = LayerMeta(
                class_path=f"{type(m).__module__}.{type(m).__qualname__}",
                eps=float(m.eps) if isinstance(getattr(m, "eps", None), (int, float)) else None,
                momentum=getattr(m, "momentum", None) if isinstance(getattr(m, "momentum", None), (int, float)) else None,
                momentum_given=hasattr(m, "momentum"),
                affine=getattr(m, "affine", None),
                track_running_stats=getattr(m, "track_running_stats", None),
            )
        ckpt = Checkpoint.from_tensors(self.model.state_dict(), path=f"<{type(self.model).__name__}>", layer_meta=meta)
        return WatchReport((audit_checkpoint(ckpt),), events=tuple(self.events))

    # ---- hooks ----------------------------------------------------------------------------------------------------

    def _model_pre(self, module, args) -> None:
        import torch

        if self._depth == 0:
            self._grad_at_forward = torch.is_grad_enabled()
            self._forwards_in_step += 1
        self._depth += 1

    def _model_post(self, module, args, output) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return
        self._flush_no_grad()
        if self.optimizer is None:
            self._advance()

    def _optimizer_step(self, optimizer, args, kwargs) -> None:
        if not self._forwards_in_step:  # the model itself was not called (its submodules were): compare the layers
            counts = [layer.updates_in_step for layer in self.layers.values() if layer.updates_in_step]
            for layer in self.layers.values():
                if counts and layer.updates_in_step > min(counts):
                    self._repeated(layer, min(counts), by_model=False)
        self._advance()

    def _repeated(self, layer: _Layer, reference: int, by_model: bool) -> None:
        if "BN017" in layer.reported:
            return
        layer.reported.add("BN017")
        rule = _rule("BN017")
        self._emit(BatchNormEvent(rule.id, rule.name, rule.severity, layer.name, self.step,
                                  rule.check(layer.updates_in_step, reference, self.step, by_model)))

    def _advance(self) -> None:
        self.step += 1
        self._forwards_in_step = 0
        for layer in self.layers.values():
            layer.updates_in_step = 0
        for t in self._step_tensors.values():
            t.add_(1)  # on the device: no synchronization
        if self.every > 1 and self.step % self.every == 0:
            self._look()

    def _pre_hook(self, layer: _Layer):
        def hook(module, args) -> None:
            if layer.kind == "counted":
                layer.version = module.num_batches_tracked._version

        return hook

    def _post_hook(self, layer: _Layer):
        def hook(module, args, output) -> None:
            if not self._updated(layer):
                return
            import torch

            grad = self._grad_at_forward if self._depth else torch.is_grad_enabled()  # before no_grad below
            with torch.no_grad():
                self._on_update(layer, args, grad)

        return hook

    def _updated(self, layer: _Layer) -> bool:
        """Whether this forward updated the layer's statistics, from host-side state only (no synchronization)."""
        m = layer.module
        if layer.kind == "norm":
            return bool(m.training and m.track_running_stats and m.running_mean is not None)
        return m.num_batches_tracked._version != layer.version

    def _on_update(self, layer: _Layer, args, grad: bool) -> None:
        import torch

        layer.updates += 1
        layer.updates_in_step += 1
        if self._last_update_step != self.step:
            self._last_update_step = self.step
            self.steps_with_updates += 1
        if not grad and getattr(layer.module, "momentum", 0.1) is not None and not _recalibrating():
            # momentum None (update_bn) or bncli.recalibrate's passes: a recalibration, no BN018
            self._no_grad.append(layer.name)
            if not self._depth:
                self._flush_no_grad()
        forwards = self._forwards_in_step
        if self.optimizer is not None and forwards and layer.updates_in_step > forwards:
            self._repeated(layer, forwards, by_model=True)
        if self._defect_step >= 0:
            return  # the first defect only: every layer after it inherits its NaN, in this step and the next ones
        m = layer.module
        bad = (~torch.isfinite(m.running_mean)).any() | (~torch.isfinite(m.running_var)).any() | (m.running_var < 0).any()
        if self.every == 1:
            if bool(bad):
                self._defect(layer, self.step, args[0] if args else None)
            return
        step = self._step_tensors.get(bad.device)
        if step is None:
            step = self._step_tensors[bad.device] = torch.full((), self.step, dtype=torch.int64, device=bad.device)
        if layer.flag is None:
            layer.flag, layer.first = bad.clone(), torch.full((), -1, dtype=torch.int64, device=bad.device)
        layer.first = torch.where(bad & (layer.first < 0), step, layer.first)
        layer.flag = layer.flag | bad

    def _flush_no_grad(self) -> None:
        if not self._no_grad:
            return
        names = list(dict.fromkeys(self._no_grad))
        self._no_grad.clear()
        key = frozenset(names)
        if key in self._no_grad_seen:
            return
        self._no_grad_seen.add(key)
        rule = _rule("BN018")
        self._emit(BatchNormEvent(rule.id, rule.name, rule.severity, names[0], self.step, rule.check(names, self.step),
                                  layers=tuple(names)))

    def _look(self) -> None:
        """Read the device flags (one synchronization) and report the layers that turned bad, at their first step."""
        import torch

        flagged = [layer for layer in self.layers.values() if layer.flag is not None and DEFECTS[0] not in layer.reported]
        if not flagged or not bool(torch.stack([layer.flag.to(flagged[0].flag.device) for layer in flagged]).any()):
            return
        bad = [(int(layer.first), i, layer) for i, layer in enumerate(flagged) if bool(layer.flag)]
        first = min(step for step, _, _ in bad)
        for step, _, layer in sorted(bad, key=lambda b: b[:2]):
            if step == first:
                self._defect(layer, step, None)  # the first bad layer of the first bad step; the rest inherit it
                break
        for _, _, layer in bad:
            layer.reported.update(DEFECTS)

    def _defect(self, layer: _Layer, step: int, x) -> None:
        """BN001 or BN002 for a layer whose buffers turned bad at `step`; `x`: that forward's input, or None."""
        import torch

        layer.reported.update(DEFECTS)
        self._defect_step = step
        m = layer.module
        mean, var = m.running_mean.detach().float().cpu(), m.running_var.detach().float().cpu()
        parts, channels = [], set()
        for label, values in (("running_mean", mean), ("running_var", var)):
            bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
            if bad:
                kinds = "/".join(sorted({"NaN" if torch.isnan(values[c]) else "Inf" for c in bad}))
                parts.append(f"{label} {kinds} in channel(s) {_show(bad)}")
                channels.update(bad)
        if parts:
            rule = _rule("BN001")
            what = f"running statistics became non-finite at step {step} ({'; '.join(parts)})"
        else:
            rule = _rule("BN002")
            bad = torch.nonzero(var < 0).flatten().tolist()
            channels.update(bad)
            what = f"running_var became negative at step {step} in channel(s) {_show(bad)}"
        cause = _input_cause(x) if x is not None else (
            f"the batch was not kept (every={self.every}); with every=1 the event names the input channel")
        self._emit(BatchNormEvent(rule.id, rule.name, rule.severity, layer.name, step, f"{what}: {cause}",
                                  channels=tuple(sorted(channels))))

    def _not_updating(self) -> None:
        updated = [layer for layer in self.layers.values() if layer.updates]
        idle = [layer.name for layer in self.layers.values() if not layer.updates and layer.can_update]
        if not updated or not idle:
            return
        rule = _rule("BN019")
        self._emit(BatchNormEvent(rule.id, rule.name, rule.severity, idle[0], self.step,
                                  rule.check(idle, self.steps_with_updates, len(updated)), layers=tuple(idle)))

    def _emit(self, event: BatchNormEvent) -> None:
        self.events.append(event)
        deliver(event, self.on_defect)


def deliver(event: BatchNormEvent, on_defect: Any, stacklevel: int = 4) -> None:
    """What on_defect says to do with one event: call it, raise BatchNormDefect (BN001/BN002 with "raise"), or warn."""
    if callable(on_defect):
        on_defect(event)
    elif event.rule in DEFECTS and on_defect == "raise":
        raise BatchNormDefect(event)
    else:
        warnings.warn(BatchNormWarning(event), stacklevel=stacklevel)


def _recalibrating() -> bool:
    import sys

    module = sys.modules.get("bncli.recalibrate")
    return bool(module is not None and getattr(module, "ACTIVE", (0,))[0])


def _input_cause(x) -> str:
    """What in the batch made the statistics bad: the input channels that held NaN or Inf, or the largest value."""
    import torch

    if not isinstance(x, torch.Tensor):
        return "the layer's input was not a tensor"
    x = x.detach()
    if x.dim() == 0:
        return "the layer's input was a scalar"
    dim = 1 if x.dim() >= 2 else 0
    flat = x.transpose(0, dim).reshape(x.shape[dim], -1)
    nan, inf = torch.isnan(flat).sum(1).cpu(), torch.isinf(flat).sum(1).cpu()
    held = []
    for c in torch.nonzero((nan + inf) > 0).flatten().tolist():
        kinds = [f"{int(n)} {label} value{'s' if n != 1 else ''}" for n, label in ((inf[c], "inf"), (nan[c], "NaN")) if n]
        held.append((c, " and ".join(kinds)))
    if held:
        first = f"input channel {held[0][0]} held {held[0][1]}"
        rest = [f"channel {c} {what}" for c, what in held[1:4]]
        more = [f"... ({len(held)} channels in all)"] if len(held) > 4 else []
        return ", ".join([first, *rest, *more])
    largest = float(flat.abs().max()) if flat.numel() else 0.0
    return (f"the input was finite (largest |value| {largest:.4g}, {str(x.dtype).removeprefix('torch.')}): the batch "
            "statistics overflowed, or the buffers were written in place")


def watch(model, optimizer=None, *, on_defect="raise", every: int = 1) -> Watch:
    """Watch a model's BatchNorm layers while it trains; see bncli.api.watch."""
    return Watch(model, optimizer, on_defect=on_defect, every=every)


from bncli.api import callable_module  # noqa: E402 - last: the module is complete before it becomes callable

callable_module(__name__, "watch")
