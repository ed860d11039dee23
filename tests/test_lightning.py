"""bncli.lightning.BatchNormWatch through a real Lightning Trainer on the CPU: one test per event, both packages."""

from __future__ import annotations

import importlib.util
import warnings

import pytest

torch = pytest.importorskip("torch")
# Lightning is imported by each test, not at collection: a pytest process that grew by Lightning's imports would
# pass its peak RSS to the child processes whose memory other tests measure (tests/test_hardening.py).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="the test extra installs Lightning (pip install 'bncli[test]')")
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import bncli  # noqa: E402

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]


def package(name):
    return pytest.importorskip(name)


def make_module(L, *, checkpointed=False, poison_step=None, validate_in_train=False, freeze_block=False):
    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.stem = nn.BatchNorm2d(3)
            self.block0 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.block1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = self.block0(self.stem(x))
            x = checkpoint(self.block1, x, use_reentrant=False) if checkpointed else self.block1(x)
            return self.head(x.mean((2, 3)))

        def on_train_epoch_start(self):
            if freeze_block:
                self.block1.eval()  # a frozen sub-block, after Lightning's model.train()

        def training_step(self, batch, _):
            (x,) = batch
            if self.global_step == poison_step:
                x = x.clone()
                x[0, 1, 2, 2] = float("inf")
            return self(x).square().mean()

        def validation_step(self, batch, _):
            return self(batch[0]).square().mean()

        def on_validation_model_eval(self):
            if not validate_in_train:
                super().on_validation_model_eval()  # overriding it without this: validation in train mode

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Module()


def loader(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(n, 3, 8, 8, generator=g)), batch_size=4)


def trainer(L, callback, **kw):
    settings = dict(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=2)
    settings.update(kw)
    return L.Trainer(callbacks=[callback], **settings)


def no_hooks(module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


@pytest.mark.parametrize("name", PACKAGES)
def test_inf_stops_fit_at_its_step(name, tmp_path):
    L = package(name)
    from bncli.lightning import BatchNormWatch

    module = make_module(L, poison_step=3)
    with pytest.raises(bncli.BatchNormDefect) as info:
        trainer(L, BatchNormWatch(), default_root_dir=tmp_path).fit(module, loader())
    assert (info.value.rule, info.value.layer, info.value.step) == ("BN001", "stem", 3)
    assert "input channel 1 held 1 inf value" in info.value.message
    assert no_hooks(module)


def test_checkpointed_block_gets_bn017(tmp_path):
    L = package("lightning.pytorch")
    from bncli.lightning import BatchNormWatch

    callback = BatchNormWatch(on_defect="warn")
    module = make_module(L, checkpointed=True)
    with pytest.warns(bncli.BatchNormWarning):
        trainer(L, callback, default_root_dir=tmp_path).fit(module, loader())
    assert [(e.rule, e.layer, e.step) for e in callback.events] == [("BN017", "block1.1", 0)]
    assert no_hooks(module)


def test_validation_in_train_mode_gets_bn018_and_proper_validation_nothing(tmp_path):
    L = package("lightning.pytorch")
    from bncli.lightning import BatchNormWatch

    bad = BatchNormWatch()
    with pytest.warns(bncli.BatchNormWarning):
        trainer(L, bad, default_root_dir=tmp_path, val_check_interval=3).fit(
            make_module(L, validate_in_train=True), loader(), loader(8, seed=1))
    assert [(e.rule, e.step) for e in bad.events] == [("BN018", 3)]
    assert set(bad.events[0].layers) == {"stem", "block0.1", "block1.1"}
    good = BatchNormWatch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", bncli.BatchNormWarning)
        trainer(L, good, default_root_dir=tmp_path, val_check_interval=3).fit(make_module(L), loader(), loader(8, seed=1))
    assert good.events == [] and good.summary == "bncli: 3 BatchNorm layers watched over 6 steps, 3 updated; no event"


def test_frozen_sub_block_gets_bn019_at_the_end_of_fit(tmp_path):
    L = package("pytorch_lightning")
    from bncli.lightning import BatchNormWatch

    callback = BatchNormWatch()
    with pytest.warns(bncli.BatchNormWarning, match="BN019"):
        trainer(L, callback, default_root_dir=tmp_path).fit(make_module(L, freeze_block=True), loader())
    assert [(e.rule, e.layer) for e in callback.events] == [("BN019", "block1.1")]
    assert "in 6 steps while 2 others did" in callback.events[0].message
    assert callback.summary == "bncli: 3 BatchNorm layers watched over 6 steps, 2 updated; 1 BN019"


def test_counters_go_to_the_logger(tmp_path):
    L = package("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from bncli.lightning import BatchNormWatch

    logger = CSVLogger(tmp_path, name="run")
    with pytest.warns(bncli.BatchNormWarning, match="BN017"):
        trainer(L, BatchNormWatch(), default_root_dir=tmp_path, logger=logger, max_steps=-1, max_epochs=2).fit(
            make_module(L, checkpointed=True), loader(8))
    logger.finalize("success")
    import csv

    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    last = [r for r in rows if r.get("bncli/updates/stem")][-1]
    assert (float(last["bncli/updates/stem"]), float(last["bncli/updates/block1.1"])) == (4.0, 8.0)  # 2 epochs x 2 batches
    assert float(last["bncli/events"]) == 1.0


def test_negative_variance_written_in_place_is_bn002(tmp_path):
    L = package("lightning.pytorch")
    from bncli.lightning import BatchNormWatch

    module = make_module(L)
    original = module.training_step

    def training_step(batch, *args):
        if module.global_step == 2:
            with torch.no_grad():
                module.block0[1].running_var[3] = -1.0  # a buffer written in place (a bad EMA or conversion)
        return original(batch, *args)

    module.training_step = training_step
    events = []
    trainer(L, BatchNormWatch(on_defect=events.append), default_root_dir=tmp_path).fit(module, loader())
    assert [(e.rule, e.layer, e.step, e.channels) for e in events] == [("BN002", "block0.1", 2, (3,))]
