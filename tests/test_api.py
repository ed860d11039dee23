"""The Python API: `import bncli` stays cheap, and bncli.inspect/diff/recalibrate give what the CLI gives."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict

import models_for_tests
import pytest
import torch
from conftest import ROOT, SAMPLES, bn_state

import bncli


def test_import_bncli_imports_no_torch_numpy_or_rich():
    code = (
        "import sys, bncli\n"
        "assert callable(bncli.inspect) and callable(bncli.diff) and callable(bncli.recalibrate)\n"
        "print(sorted(m for m in ('torch', 'numpy', 'rich', 'typer') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_the_api_names_stay_callable_after_the_core_modules_are_imported():
    import bncli.diff  # noqa: F401 - the submodule import puts the module on the package
    import bncli.recalibrate  # noqa: F401
    from bncli.diff import diff_files  # the core is still reachable as before

    assert callable(bncli.diff) and callable(bncli.recalibrate) and callable(diff_files)
    assert set(dir(bncli)) >= {"inspect", "diff", "recalibrate", "__version__"}
    with pytest.raises(AttributeError):
        bncli.nothing  # noqa: B018


def test_inspect_equals_the_cli_json(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pyproject.toml here: the CLI reads no [tool.bncli]
    args = [SAMPLES / "model_defects.pt", SAMPLES / "model.pt", "missing.pt"]
    result = cli("inspect", *args, "--format", "json", "--ignore", "dead-channel", "--max-fold-spread", "200", "--eps", "1e-4")
    assert result.exit_code == 3
    report = bncli.inspect(args, ignore="dead-channel", max_fold_spread=200, eps=1e-4)
    assert json.loads(report.to_json()) == json.loads(result.stdout)
    assert report.to_json() + "\n" == result.stdout
    assert [f.rule for f in report.findings] == ["BN003", "BN001", "BN004", "BN002"]  # eps 1e-4: spread below 200
    assert report.unreadable[0].path == "missing.pt"
    one = bncli.inspect(SAMPLES / "model_defects.pt", layer="features.9")
    assert json.loads(one.to_json()) == json.loads(cli("inspect", SAMPLES / "model_defects.pt", "-l", "features.9", "-f", "json").stdout)


def test_inspect_options_are_checked_like_the_cli():
    from bncli.errors import UsageError

    with pytest.raises(UsageError, match="max-fold-spread: must be a number > 0"):
        bncli.inspect(SAMPLES / "model.pt", max_fold_spread=-1)
    with pytest.raises(UsageError, match="unknown rule 'BN999'"):
        bncli.inspect(SAMPLES / "model.pt", select=["BN999"])
    with pytest.raises(TypeError, match="max_varr"):
        bncli.inspect(SAMPLES / "model.pt", max_varr=3)


def test_diff_equals_the_cli_json(cli, make_ckpt):
    sd = bn_state(4, "backbone.bn", seed=0)
    sd.update(bn_state(4, "head.bn", seed=1))
    ema = OrderedDict((k, v.clone()) for k, v in sd.items())
    ema["head.bn.running_mean"] += 0.125
    path = make_ckpt({"model": sd, "ema": ema}, "ckpt.pt")
    result = cli("diff", path, path, "--state-a", "model", "--state-b", "ema", "--only", "*.bn", "--exclude", "backbone.*",
                 "--fail-on-change", "--atol", "1e-7", "-f", "json")
    assert result.exit_code == 1
    report = bncli.diff(path, path, state_a="model", state_b="ema", only="*.bn", exclude=["backbone.*"],
                        fail_on_change=True, atol=1e-7)
    assert json.loads(report.to_json()) == json.loads(result.stdout)
    assert report.failed and report.violations == ("head.bn",)
    plain = bncli.diff(SAMPLES / "model.pt", SAMPLES / "model_defects.pt", layer="features.5")
    assert json.loads(plain.to_json()) == json.loads(cli("diff", SAMPLES / "model.pt", SAMPLES / "model_defects.pt",
                                                         "--layer", "features.5", "-f", "json").stdout)


# --------------------------------------------------------------------------- recalibrate


def uneven_batches(n=45, batch=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, 8, 8), generator=g) * 2.0 + 3.0
    return x, list(torch.split(x, batch))  # 5 batches of 8, then one of 5


def test_recalibrate_live_model_equals_the_cli(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, batches = uneven_batches()
    torch.save(models_for_tests.deep().state_dict(), tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    result = cli("recalibrate", tmp_path / "model.pt", "-m", "models_for_tests:deep", "-d", tmp_path / "x.pt", "-b", "8",
                 "-o", tmp_path / "out.pt")
    assert result.exit_code == 0, result
    written = torch.load(tmp_path / "out.pt", weights_only=True)

    model = models_for_tests.deep()
    model.train()
    drift = bncli.recalibrate(model, batches)
    state = model.state_dict()
    for key, value in written.items():
        assert torch.equal(state[key], value), key  # the same exact statistics, bit for bit
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert [layer.verdict for layer in drift.layers] == ["changed"] * 4
    assert drift.layers[0].batches_change == 6


def test_recalibrate_matches_the_float64_formula_and_reports_the_drift():
    x, batches = uneven_batches()
    model = models_for_tests.pointwise()
    old_mean, old_var = model[1].running_mean.double().clone(), model[1].running_var.double().clone()
    drift = bncli.recalibrate(model, batches)
    w = torch.tensor(models_for_tests.POINTWISE_WEIGHT, dtype=torch.float64)
    b = torch.tensor(models_for_tests.POINTWISE_BIAS, dtype=torch.float64)
    y = torch.einsum("oc,nchw->onhw", w, x.double()).reshape(4, -1) + b[:, None]
    mean, var = y.mean(dim=1), y.var(dim=1, correction=1)
    bn = model[1]
    assert torch.all((bn.running_mean.double() - mean).abs() <= 1e-6 * var.sqrt())
    assert torch.allclose(bn.running_var.double(), var, rtol=1e-6, atol=0)
    assert int(bn.num_batches_tracked) == 6
    shift = ((bn.running_mean.double() - old_mean).abs() / (old_var + 1e-5).sqrt()).max().item()
    assert drift.layers[0].max_shift == pytest.approx(shift, rel=1e-9)
    assert drift.path_a == "before" and drift.path_b == "after"
    assert json.loads(drift.to_json())["layers"][0]["name"] == "1"


def test_recalibrate_with_dict_batches_a_forward_and_chosen_layers():
    x, batches = uneven_batches()
    model = models_for_tests.deep()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = models_for_tests.deep()
    bncli.recalibrate(reference, batches)
    seen = []

    def forward(m, batch):
        seen.append(batch["image"].shape[0])
        return m(batch["image"])

    drift = bncli.recalibrate(model, ({"image": t, "label": 0} for t in batches), forward=forward, layers="body.*")
    assert seen == [8, 8, 8, 8, 8, 5]
    assert [layer.name for layer in drift.layers] == ["body.1", "body.5", "body.9"]
    state = model.state_dict()
    for key in ("head.1.running_mean", "head.1.running_var", "head.1.num_batches_tracked"):
        assert torch.equal(state[key], before[key]), key  # not chosen: untouched (it ran in eval mode)
    # body.1 sees the same inputs whichever layers are chosen (it comes first): the same statistics
    assert torch.equal(state["body.1.running_var"], reference.state_dict()["body.1.running_var"])


def test_recalibrate_errors():
    from bncli.errors import InputError

    model = models_for_tests.pointwise()
    with pytest.raises(InputError, match=r"layers 'head\.\*' matches no BatchNorm layer of the model; layers: 1"):
        bncli.recalibrate(model, [torch.zeros(2, 3, 4, 4)], layers="head.*")
    with pytest.raises(InputError, match="a batch of type dict is not a tensor"):
        bncli.recalibrate(model, [{"x": torch.zeros(2, 3, 4, 4)}])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):

        def failing(m, batch):
            m(batch)
            raise RuntimeError("boom")

        bncli.recalibrate(model, [torch.randn(2, 3, 4, 4)], forward=failing)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # a failed run leaves the buffers as they were
