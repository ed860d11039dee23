"""bncli.watch on real training loops on the CPU: each event at the step and the layer that cause it."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import bncli  # noqa: E402


class Net(nn.Module):
    """A BatchNorm on the input, then three conv+BN blocks; `checkpointed` names the blocks run under
    torch.utils.checkpoint."""

    def __init__(self, checkpointed=(), reentrant: bool = False) -> None:
        super().__init__()
        self.stem = nn.BatchNorm2d(3)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()) for i in range(3)
        )
        self.head = nn.Linear(6, 2)
        self.checkpointed, self.reentrant = set(checkpointed), reentrant

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=self.reentrant) if i in self.checkpointed else block(x)
        return self.head(x.mean((2, 3)))


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def fit(model, opt, data, poison_at=None, poison=None, validate=None):
    """A plain loop; `poison(model, x)` changes the batch of step `poison_at`; `validate(model)` after each step."""
    model.train()
    for step, x in enumerate(data):
        if step == poison_at:
            x = poison(model, x)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if validate is not None:
            validate(model)


def all_hooks(model, opt) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return n + len(opt._optimizer_step_post_hooks)


def inject_inf(model, x):
    x = x.clone()
    x[3, 2, 4, 5] = float("inf")  # one inf in input channel 2
    return x


def test_inf_at_step_7_is_raised_at_step_7_with_layer_and_channel():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen_before = []
    with pytest.raises(bncli.BatchNormDefect) as info, bncli.watch(model, opt) as w:
        fit(model, opt, batches(12), poison_at=7, poison=inject_inf, validate=lambda m: seen_before.append(list(w.events)))
    defect = info.value
    assert (defect.rule, defect.layer, defect.step) == ("BN001", "stem", 7)
    assert all(events == [] for events in seen_before) and len(seen_before) == 7  # nothing before step 7
    assert "input channel 2 held 1 inf value" in defect.message
    assert defect.channels == (2,)
    # what bncli.inspect says of the same buffers now: the reference the event agrees with
    assert not torch.isfinite(model.stem.running_var[2]) and torch.isfinite(model.stem.running_var[[0, 1]]).all()
    assert all_hooks(model, opt) == 0


def test_inf_without_optimizer_counts_forwards_and_warns_when_asked():
    model = Net()
    data = batches(6)
    data[4] = inject_inf(model, data[4])
    with warnings.catch_warnings(record=True) as caught, bncli.watch(model, on_defect="warn"):
        warnings.simplefilter("always")
        for x in data:
            model(x)
    (event,) = [w.message for w in caught if isinstance(w.message, bncli.BatchNormWarning)]
    assert (event.rule, event.layer, event.step) == ("BN001", "stem", 4)  # the 5th forward, counted from 0
    assert all_hooks(model, torch.optim.SGD(model.parameters())) == 0


def test_every_n_keeps_the_first_bad_step_on_the_device():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    events = []
    with bncli.watch(model, opt, on_defect=events.append, every=5) as w:
        fit(model, opt, batches(12), poison_at=7, poison=inject_inf)
        assert len(events) == 1  # looked at after step 10
    (event,) = [e for e in w.events if e.rule == "BN001"]
    assert (event.layer, event.step) == ("stem", 7) and "every=5" in event.message


def test_negative_variance_is_bn002():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def corrupt(model, x):
        with torch.no_grad():
            model.blocks[1][1].running_var[4] = -50.0  # a buffer written in place: no batch variance is negative
        return x

    with pytest.raises(bncli.BatchNormDefect) as info, bncli.watch(model, opt):
        fit(model, opt, batches(5), poison_at=3, poison=corrupt)
    assert (info.value.rule, info.value.layer, info.value.step, info.value.channels) == ("BN002", "blocks.1.1", 3, (4,))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_blocks_get_bn017_and_their_neighbours_do_not(reentrant):
    model = Net(checkpointed={1}, reentrant=reentrant)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncli.watch(model, opt, on_defect=lambda e: None) as w:
        fit(model, opt, batches(4))
    assert int(model.blocks[1][1].num_batches_tracked) == 8 and int(model.blocks[0][1].num_batches_tracked) == 4
    repeated = [e for e in w.events if e.rule == "BN017"]
    assert [(e.layer, e.step) for e in repeated] == [("blocks.1.1", 0)]  # once per layer, at the first step
    assert repeated[0].message.startswith("updated 2 times in step 0, over 1 forward of the model in train mode")
    assert [e.rule for e in w.events] == ["BN017"]  # no BN018 for the recomputation, whatever checkpoint variant


def test_gradient_accumulation_is_not_a_repeated_update():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncli.watch(model, opt, on_defect=lambda e: pytest.fail(str(e))):
        for i, x in enumerate(batches(8)):
            model(x).square().mean().backward()
            if i % 4 == 3:
                opt.step()
                opt.zero_grad()


def test_validation_under_no_grad_in_train_mode_gets_bn018():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    val = batches(2, seed=1)

    def validate(model):  # forgot model.eval()
        with torch.no_grad():
            for x in val:
                model(x)

    with pytest.warns(bncli.BatchNormWarning) as caught, bncli.watch(model, opt) as w:
        fit(model, opt, batches(3), validate=validate)
    (event,) = w.events  # once for the set of layers, although every validation repeats it
    assert [c.message.event for c in caught] == [event]
    assert (event.rule, event.step, event.layers) == ("BN018", 1, ("stem", "blocks.0.1", "blocks.1.1", "blocks.2.1"))
    assert event.message.endswith("validation without model.eval()?")


def test_inference_mode_in_train_mode_gets_bn018_too():
    model = Net()
    with bncli.watch(model, on_defect=lambda e: None) as w, torch.inference_mode():
        model(batches(1)[0])
    assert [e.rule for e in w.events] == ["BN018"]


def test_eval_validation_and_update_bn_get_nothing():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    val = batches(2, seed=1)

    def validate(model):
        model.eval()
        with torch.no_grad():
            for x in val:
                model(x)
        model.train()

    with warnings.catch_warnings():
        warnings.simplefilter("error", bncli.BatchNormWarning)
        with bncli.watch(model, opt) as w:
            fit(model, opt, batches(3), validate=validate)
            torch.optim.swa_utils.update_bn([(x,) for x in batches(3, seed=2)], model)  # momentum None: recalibration
            bncli.recalibrate(model, batches(2, seed=3))
    assert w.events == []
    assert model.blocks[0][1].momentum == 0.1  # update_bn put it back


def test_a_sub_block_left_in_eval_gets_bn019():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(bncli.BatchNormWarning) as caught, bncli.watch(model, opt) as w:
        model.train()
        model.blocks[2].eval()  # frozen, and never put back
        for x in batches(5):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    (event,) = w.events
    assert caught[0].message.event == event
    assert (event.rule, event.layer, event.severity.value) == ("BN019", "blocks.2.1", "info")
    assert event.message.startswith("1 layer (blocks.2.1) never updated its running statistics in 5 steps while 3 others did")


def test_no_bn019_when_nothing_trained_or_a_frozen_class():
    model = Net()
    with bncli.watch(model, on_defect=lambda e: pytest.fail(str(e))):
        model.eval()
        model(batches(1)[0])  # nothing updated at all: no layer updated "while others did"


def test_close_removes_every_hook_and_is_idempotent():
    model = Net(checkpointed={1})
    opt = torch.optim.Adam(model.parameters())
    before = all_hooks(model, opt)
    w = bncli.watch(model, opt, on_defect=lambda e: None)
    assert all_hooks(model, opt) > before
    fit(model, opt, batches(2))
    w.close()
    w.close()
    assert all_hooks(model, opt) == before == 0
    n = len(w.events)
    fit(model, opt, batches(2))
    assert len(w.events) == n  # nothing watches any more


def test_report_is_inspect_of_the_live_model_plus_the_events(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncli.watch(model, opt, on_defect="warn") as w, pytest.warns(bncli.BatchNormWarning):
        fit(model, opt, batches(9), poison_at=7, poison=inject_inf)
        report = w.report()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    saved = bncli.inspect(tmp_path / "sd.pt")
    assert [(f.rule, f.layer, f.message) for f in report.findings] == [(f.rule, f.layer, f.message) for f in saved.findings]
    assert [x.name for x in report.files[0].layers] == ["stem", "blocks.0.1", "blocks.1.1", "blocks.2.1"]
    assert report.files[0].layers[0].eps == 1e-5 and report.files[0].format == "memory"
    assert [e.rule for e in report.events] == ["BN001"]
    assert "BN001" in [f.rule for f in report.findings]


def test_arguments_are_checked():
    model = Net()
    with pytest.raises(ValueError, match="on_defect"):
        bncli.watch(model, on_defect="ignore")
    with pytest.raises(ValueError, match="every"):
        bncli.watch(model, every=0)
    with pytest.raises(TypeError):
        bncli.watch(object())


def test_submodules_called_directly_compare_the_layers_at_the_step():
    model = Net(checkpointed={1})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def run(x):  # the model itself is never called: only its parts
        x = model.stem(x)
        x = model.blocks[0](x)
        x = checkpoint(model.blocks[1], x, use_reentrant=False)
        return model.head(model.blocks[2](x).mean((2, 3)))

    with bncli.watch(model, opt, on_defect=lambda e: None) as w:
        for i, x in enumerate(batches(4)):
            run(x).square().mean().backward()
            if i % 2 == 1:  # and gradients accumulated over 2 batches: 2 updates per step everywhere else
                opt.step()
                opt.zero_grad()
    assert [(e.rule, e.layer, e.step) for e in w.events] == [("BN017", "blocks.1.1", 0)]
    assert "updated 4 times in step 0, while other layers updated 2 times" in w.events[0].message


def test_live_rules_are_listed_but_never_run_by_inspect(cli):
    from conftest import SAMPLES

    listing = cli("rules").stdout
    assert all(f"BN0{n}" in listing for n in (17, 18, 19))
    result = cli("inspect", SAMPLES / "model.pt", "--select", "BN017,not-updating")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --select leaves only live rules (BN017, BN019)")
    from bncli.rules import RULES, run_file_rules

    assert {r.id for r in RULES if r.scope == "live"} == {"BN017", "BN018", "BN019"}
    assert run_file_rules([], selected=frozenset({"BN017", "BN018", "BN019"})) == []
