"""BN016 uneven-batch-counts on checkpoints of real (tiny, CPU) training loops, and diff's count column."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from bncli.audit import inspect_file  # noqa: E402
from bncli.report import Severity  # noqa: E402


class Net(nn.Module):
    """Two conv+BN blocks; the second one optionally under activation checkpointing."""

    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        self.block0 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)
        self.checkpointed = checkpointed

    def forward(self, x):
        x = self.block0(x)
        x = checkpoint(self.block1, x, use_reentrant=False) if self.checkpointed else self.block1(x)
        return self.head(x.mean((2, 3)))


def train(model, steps: int = 10, accumulate: int = 1, keep_eval=()):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for module in keep_eval:
        module.eval()
    for _ in range(steps):
        for _ in range(accumulate):
            x = torch.randn(8, 3, 8, 8)
            model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def bn016(path):
    return [f for f in inspect_file(path).findings if f.rule == "BN016"]


def test_checkpointed_block_counts_twice(tmp_path):
    model = Net(checkpointed=True)
    train(model, steps=10)
    assert int(model.block1[1].num_batches_tracked) == 20  # what the rule is about: torch really does this
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    (f,) = bn016(tmp_path / "sd.pt")
    assert f.severity is Severity.WARNING and f.layer == "block1.1"
    assert f.message == ("1 layer counted 20 batches, 1 layer 10: 2x, updated twice per step: activation checkpointing "
                         "or a second forward in train mode")


def test_checkpointed_block_against_optimizer_steps(tmp_path):
    model = Net(checkpointed=True)
    opt = train(model, steps=10)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    (f,) = bn016(tmp_path / "ckpt.pt")
    assert f.layer == "block1.1" and f.severity is Severity.WARNING
    assert "1 layer 10 (the checkpoint records 10 optimizer steps): 2x" in f.message


def test_equal_counts_no_finding(tmp_path):
    model = Net()
    opt = train(model, steps=10)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    assert bn016(tmp_path / "sd.pt") == [] and bn016(tmp_path / "ckpt.pt") == []


def test_accumulation_ratio_is_info(tmp_path):
    model = Net()
    opt = train(model, steps=5, accumulate=4)
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "acc.pt")
    (f,) = bn016(tmp_path / "acc.pt")
    assert f.severity is Severity.INFO and f.layer is None
    assert f.message == ("every layer (2) counted 20 batches over the 5 optimizer steps the checkpoint records: 4x: "
                         "gradient accumulation over 4 batches, or 4 forwards in train mode per step")


def test_accumulation_with_a_checkpointed_block_keeps_the_warning(tmp_path):
    model = Net(checkpointed=True)
    opt = train(model, steps=5, accumulate=2)
    torch.save({"global_step": 5, "state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]},
               tmp_path / "acc.pt")
    found = {f.severity: f for f in bn016(tmp_path / "acc.pt")}
    assert set(found) == {Severity.INFO, Severity.WARNING}
    assert found[Severity.WARNING].layer == "block1.1"
    assert found[Severity.WARNING].message.startswith("1 layer counted 20 batches, 1 layer 10 (the checkpoint records 5")
    assert found[Severity.INFO].message.startswith("1 layer (block0.1) counted 10 batches over the 5 optimizer steps")


def test_frozen_layer_beside_trained_ones(tmp_path):
    model = Net()
    with torch.no_grad():  # pretrained statistics loaded without their counts, then frozen
        model.block1[1].running_mean.fill_(0.25)
        model.block1[1].running_var.fill_(2.0)
    train(model, steps=3, keep_eval=[model.block1[1]])
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    (f,) = bn016(tmp_path / "sd.pt")
    assert f.layer == "block1.1"
    assert f.message == "1 layer counted 0 batches, 1 layer 3: never updated: frozen, or loaded from weights without counts"


def test_a_layer_at_its_initial_statistics_is_left_to_bn003(tmp_path):
    model = Net()
    train(model, steps=3, keep_eval=[model.block1[1]])
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    rules = [f.rule for f in inspect_file(tmp_path / "sd.pt").findings]
    assert "BN003" in rules and "BN016" not in rules


def test_no_counts_no_finding(tmp_path):
    sd = {k: v for k, v in Net().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "sd.pt")
    assert bn016(tmp_path / "sd.pt") == []


@pytest.mark.parametrize(
    ("container", "steps"),
    [
        ({"global_step": 7}, 7),
        ({"global_step": 7.0}, 7),
        ({"global_step": -1}, None),
        ({"global_step": float("nan")}, None),
        ({"global_step": True}, None),
        ({"global_step": "7"}, None),
        ({"optimizer": {"state": {0: {"step": torch.tensor(9.0)}, 1: {"step": torch.tensor(9.0)}}}}, 9),
        ({"optimizer": {"state": {0: {"step": torch.tensor([1.0, 2.0])}}}}, None),
        ({"optimizer": {"state": {0: {"step": torch.tensor(2.5)}}}}, None),
        ({"optimizer": {"state": {}, "param_groups": []}}, None),
        ({"epoch": 3}, None),
    ],
)
def test_optimizer_steps_read_from_the_container(tmp_path, container, steps):
    from bncli.loading import load_checkpoint

    torch.save({"model": Net().state_dict(), **container}, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt").provenance.optimizer_steps == steps


def test_a_bare_state_dict_records_no_steps(tmp_path):
    from bncli.loading import load_checkpoint

    torch.save(Net().state_dict(), tmp_path / "sd.pt")
    assert load_checkpoint(tmp_path / "sd.pt").provenance.optimizer_steps is None


def test_diff_names_the_layers_whose_counts_moved_unevenly(tmp_path, cli):
    import json

    model = Net(checkpointed=True)
    torch.save(model.state_dict(), tmp_path / "a.pt")
    train(model, steps=5)
    torch.save(model.state_dict(), tmp_path / "b.pt")
    table = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert "num_batches_tracked changed unevenly: block1.1 +10; the other 1 layer +5\n" in table.stdout
    data = json.loads(cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--format", "json").stdout)
    assert data["uneven_batches"] == [{"layer": "block1.1", "batches_change": 10}]
    md = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--format", "markdown").stdout
    assert "num_batches_tracked changed unevenly: `block1.1` +10; the other 1 layer +5" in md


def test_diff_even_counts_say_nothing(tmp_path, cli):
    import json

    model = Net()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    train(model, steps=3)
    torch.save(model.state_dict(), tmp_path / "b.pt")
    assert "unevenly" not in cli("diff", tmp_path / "a.pt", tmp_path / "b.pt").stdout
    assert json.loads(cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--format", "json").stdout)["uneven_batches"] == []


def test_a_real_lightning_checkpoint_with_counts_equal_to_global_step_is_clean(tmp_path):
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def training_step(self, batch, _):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 8, 8))
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    from bncli.loading import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "last.ckpt")
    assert ckpt.provenance.optimizer_steps == 6 and ckpt.provenance.container == "state_dict"
    assert bn016(tmp_path / "last.ckpt") == []
    # The same run with accumulate_grad_batches=2: every layer counted twice the steps, an info
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "acc.ckpt")
    (f,) = bn016(tmp_path / "acc.ckpt")
    assert f.severity is Severity.INFO and "counted 6 batches over the 3 optimizer steps" in f.message
