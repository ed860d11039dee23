"""`bncli inspect`: layer discovery, findings, exit codes and the JSON contract."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SAMPLES, bn_state

from bncli.audit import inspect_file


def _findings(report):
    return {(f.rule, f.name, f.severity.value, f.layer, f.channels) for f in report.findings}


@pytest.mark.parametrize("name", ["model_defects.pt", "model_defects.safetensors"])
def test_sample_defects_are_all_found(name):
    report = inspect_file(SAMPLES / name)
    assert [layer.name for layer in report.layers] == ["features.1", "features.5", "features.9"]
    assert _findings(report) == {
        ("BN003", "never-updated", "error", "features.1", ()),
        ("BN001", "non-finite", "error", "features.5", (3,)),
        ("BN004", "collapsed-variance", "warning", "features.5", (7, 11)),
        ("BN015", "fold-risk", "info", "features.5", (7, 11)),
        ("BN002", "negative-variance", "error", "features.9", (4,)),
        ("BN005", "dead-channel", "info", "features.9", (0, 2, 5)),
    }


def test_pt_and_safetensors_agree():
    a, b = inspect_file(SAMPLES / "model.pt"), inspect_file(SAMPLES / "model.safetensors")
    assert a.layers == b.layers
    assert (a.container, a.prefix) == ("state_dict", "module.")
    assert (b.container, b.prefix) == (None, None)


def test_summary_numbers_match_numpy():
    sd = torch.load(SAMPLES / "model.pt", weights_only=True)["state_dict"]
    layer = inspect_file(SAMPLES / "model.pt").layers[1]
    mean = sd["module.features.5.running_mean"].double()
    var = sd["module.features.5.running_var"].double()
    assert layer.num_features == 32
    assert layer.num_batches_tracked == int(sd["module.features.5.num_batches_tracked"])
    assert layer.running_mean.min == pytest.approx(mean.min().item())
    assert layer.running_mean.center == pytest.approx(mean.mean().item())
    assert layer.running_var.center == pytest.approx(var.median().item() if len(var) % 2 else var.sort().values[15:17].mean().item())
    assert layer.weight_abs_min == pytest.approx(sd["module.features.5.weight"].abs().min().item())


def test_names_without_bn_and_count_shapes(make_ckpt):
    sd = bn_state(prefix="features.3.1")
    sd.update(bn_state(prefix="layer2.0.downsample.1", seed=1))
    sd["features.3.1.num_batches_tracked"] = torch.tensor([7])  # a one-element tensor
    sd["layer2.0.downsample.1.num_batches_tracked"] = 9  # a plain Python int
    sd["conv.weight"] = torch.randn(4, 4, 3, 3)
    report = inspect_file(make_ckpt(sd))
    assert [(x.name, x.num_batches_tracked) for x in report.layers] == [("features.3.1", 7), ("layer2.0.downsample.1", 9)]


def test_affine_false_and_missing_count(make_ckpt):
    sd = bn_state(affine=False)
    del sd["bn.num_batches_tracked"]
    layer = inspect_file(make_ckpt(sd)).layers[0]
    assert layer.weight_abs_min is None and layer.num_batches_tracked is None


def test_thresholds_are_strict(make_ckpt):
    sd = bn_state(channels=4)
    sd["bn.running_var"] = torch.tensor([1.01e-5, 0.99e-5, 1.0, 1.0])
    sd["bn.weight"] = torch.tensor([1e-3, -0.99e-3, 1.0, 1.0])
    assert _findings(inspect_file(make_ckpt(sd))) == {
        ("BN004", "collapsed-variance", "warning", "bn", (1,)),
        ("BN005", "dead-channel", "info", "bn", (1,)),
    }


def test_inf_and_nan_in_affine(make_ckpt):
    sd = bn_state(channels=3)
    sd["bn.bias"] = torch.tensor([0.0, math.inf, -math.inf])
    assert _findings(inspect_file(make_ckpt(sd))) == {("BN001", "non-finite", "error", "bn", (1, 2))}


def test_cli_table_and_exit_codes(cli):
    clean = cli("inspect", SAMPLES / "model.pt")
    assert clean.exit_code == 0, clean
    assert "features.9" in clean.stdout and "findings: 0 errors" in clean.stdout

    bad = cli("inspect", SAMPLES / "model_defects.pt")
    assert bad.exit_code == 1, bad
    assert "never-updated" in bad.stdout and "3 errors, 1 warning, 2 info" in bad.stdout
    assert bad.stderr == ""
    assert cli("inspect", SAMPLES / "model_defects.pt", "--fail-on", "never").exit_code == 0


@pytest.mark.parametrize(("fail_on", "code"), [("error", 0), ("warning", 1), ("info", 1), ("never", 0)])
def test_fail_on_levels(cli, make_ckpt, fail_on, code):
    sd = bn_state(channels=4)
    sd["bn.running_var"][2] = 1e-9  # one warning, nothing worse
    assert cli("inspect", make_ckpt(sd), "--fail-on", fail_on).exit_code == code


def test_fail_on_info_only(cli, make_ckpt):
    sd = bn_state(channels=4)
    sd["bn.weight"][0] = 0.0
    path = make_ckpt(sd)
    assert cli("inspect", path, "--fail-on", "warning").exit_code == 0
    assert cli("inspect", path, "--fail-on", "info").exit_code == 1


def test_json_contract(cli):
    result = cli("inspect", SAMPLES / "model_defects.pt", "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    (file,) = data["files"]
    assert file["path"].endswith("model_defects.pt")
    assert {"name", "num_features", "num_batches_tracked"} <= set(file["layers"][0])
    assert {"rule", "severity", "layer", "channels", "message"} <= set(file["findings"][0])
    nan_layer = file["layers"][1]
    assert nan_layer["running_var"]["min"] == pytest.approx(1e-8)  # finite values only
    assert "non-finite" in nan_layer["flags"]


def test_layer_view(cli):
    result = cli("inspect", SAMPLES / "model_defects.pt", "--layer", "features.9", "-f", "json")
    data = json.loads(result.stdout)
    (layer,) = data["files"][0]["layers"]
    assert layer["name"] == "features.9"
    rows = layer["channels"]
    assert len(rows) == 32 and rows[4]["running_var"] == -0.5
    assert {"index", "running_mean", "running_var", "weight", "bias"} <= set(rows[0])
    assert rows[4]["running_std"] is None  # sqrt of a negative variance: null, never NaN in JSON
    assert "negative-variance" in rows[4]["flags"] and rows[0]["flags"] == ["dead-channel"]

    table = cli("inspect", SAMPLES / "model_defects.pt", "--layer", "features.5")
    assert table.exit_code == 1
    assert "running std" in table.stdout and "nan" in table.stdout


def test_unknown_layer_lists_nearest(cli):
    result = cli("inspect", SAMPLES / "model.pt", "--layer", "features.6")
    assert result.exit_code == 2  # the user's argument, not a bad file
    assert result.stderr.count("\n") == 1
    assert "no BatchNorm layer named 'features.6'; nearest: features.1, features.5, features.9" in result.stderr


def test_affine_none_layer_json(cli, make_ckpt):
    result = cli("inspect", make_ckpt(bn_state(affine=False)), "-l", "bn", "-f", "json")
    rows = json.loads(result.stdout)["files"][0]["layers"][0]["channels"]
    assert rows[0]["weight"] is None and rows[0]["bias"] is None


def test_no_batchnorm_layers(cli, make_ckpt):
    result = cli("inspect", make_ckpt({"fc.weight": torch.randn(2, 2)}))
    assert result.exit_code == 0
    assert "BN011 no-batchnorm" in result.stdout


def test_model_and_ema_report_the_alternative(cli, make_ckpt):
    path = make_ckpt({"model": bn_state(seed=1), "model_ema": bn_state(seed=2), "epoch": 3})
    data = json.loads(cli("inspect", path, "-f", "json").stdout)["files"][0]
    assert (data["container"], data["alternatives"]) == ("model", ["model_ema"])
    table = cli("inspect", path).stdout
    assert "state dict under 'model', also 'model_ema' (choose with --state)" in table
    ema = json.loads(cli("inspect", path, "--state", "model_ema", "-f", "json").stdout)["files"][0]
    assert ema["container"] == "model_ema"
    assert ema["layers"][0]["running_mean"] != data["layers"][0]["running_mean"]
