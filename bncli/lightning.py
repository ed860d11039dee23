"""`bncli.lightning.BatchNormWatch`: `bncli.watch` as a Lightning callback, for `lightning` and `pytorch_lightning`.

    from bncli.lightning import BatchNormWatch
    trainer = Trainer(callbacks=[BatchNormWatch()])

The callback watches the LightningModule from the start of `fit` to its end (the optimizer's steps number the
events: they equal `trainer.global_step`), logs per-layer update counters through the trainer's logger at the end
of each training epoch (rank zero only) and prints a summary at the end of fit. Install: `pip install
'bncli[lightning]'`. The class derives from the Callback of each Lightning package installed, so that either
package's Trainer accepts it.
"""

from __future__ import annotations

import importlib
from typing import Any


def _packages() -> list[Any]:
    found = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    if not found:
        raise ImportError("bncli.lightning needs Lightning: pip install 'bncli[lightning]' (or pytorch_lightning)")
    return found


_PACKAGES = _packages()


def _rank_zero_info(message: str) -> None:
    _PACKAGES[0].utilities.rank_zero_info(message)


class BatchNormWatch(*(package.Callback for package in _PACKAGES)):
    """Watch the model's BatchNorm layers while Lightning trains it (rules BN001/BN002 live, BN017-BN019).

    `on_defect`: "raise" (a `bncli.BatchNormDefect` for BN001/BN002 stops `fit`; the other events warn), "warn",
    or a callable that receives each event. `log`: per-layer update counters (`bncli/updates/<layer>`) and the
    number of events (`bncli/events`) through the trainer's logger. `every`: as `bncli.watch`'s.
    `.events` holds every event seen; `.summary` the text printed at the end of fit.
    """

    def __init__(self, on_defect="raise", log: bool = True, every: int = 1) -> None:
        from bncli.watch import ON_DEFECT

        if not (callable(on_defect) or on_defect in ON_DEFECT):
            raise ValueError(f"on_defect must be 'raise', 'warn' or a callable; got {on_defect!r}")
        self.on_defect, self.log, self.every = on_defect, log, every
        self.watch = None
        self.events: list = []
        self.summary: str | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        from bncli.watch import Watch

        optimizers = getattr(trainer, "optimizers", None) or [None]
        self.watch = Watch(pl_module, optimizers[0], on_defect=self._on_event, every=self.every)
        self.watch.step = int(trainer.global_step)  # a resumed fit numbers its events as the trainer does

    def _on_event(self, event) -> None:
        from bncli.watch import deliver

        self.events.append(event)
        deliver(event, self.on_defect)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not (self.log and self.watch is not None and trainer.logger is not None and trainer.is_global_zero):
            return
        metrics = {f"bncli/updates/{name}": layer.updates for name, layer in self.watch.layers.items()}
        metrics["bncli/events"] = len(self.events)
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        watch, self.watch = self.watch, None
        if watch is None:
            return
        watch.close()
        updated = sum(1 for layer in watch.layers.values() if layer.updates)
        counts = {}
        for event in self.events:
            counts[event.rule] = counts.get(event.rule, 0) + 1
        seen = ", ".join(f"{n} {rule}" for rule, n in sorted(counts.items())) or "no event"
        self.summary = (f"bncli: {len(watch.layers)} BatchNorm layer{'s' if len(watch.layers) != 1 else ''} watched over "
                        f"{watch.step} steps, {updated} updated; {seen}")
        if trainer.is_global_zero:
            _rank_zero_info(self.summary)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.watch is not None:
            self.watch.close(summary=False)  # every hook removed; no BN019 from a fit cut short
            self.watch = None
