"""recalibrate --loader/--forward/--layers/--check, against closed-form statistics (45 samples: an uneven last batch)."""

from __future__ import annotations

import json
import os

import models_for_tests
import pytest
import torch

W = torch.tensor(models_for_tests.POINTWISE_WEIGHT, dtype=torch.float64)
B = torch.tensor(models_for_tests.POINTWISE_BIAS, dtype=torch.float64)

LOADERS = '''
import torch

DATA = torch.load("x.pt")


def dicts():
    return ({"image": t, "id": i} for i, t in enumerate(DATA.split(8)))


def pairs():
    return [(t, torch.zeros(len(t))) for t in DATA.split(8)]


def forward(model, batch):
    return model(batch["image"])


def failing():
    raise OSError("no such bucket")


def broken_iter():
    yield DATA[:8]
    raise ValueError("corrupt shard")


def not_iterable():
    return 3
'''


def data(n=45, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, 4, 4), generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 1.5
    return x


def closed_form(x):
    y = torch.einsum("oc,nchw->onhw", W, x.double()).reshape(4, -1) + B[:, None]
    return y.mean(dim=1), y.var(dim=1, correction=1)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    x = data()
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "calib_loaders.py").write_text(LOADERS)
    torch.save(models_for_tests.pointwise().state_dict(), tmp_path / "model.pt")
    return tmp_path, x


def written_stats(path, layer="1"):
    sd = torch.load(path, weights_only=True)
    return sd[f"{layer}.running_mean"].double(), sd[f"{layer}.running_var"].double(), int(sd[f"{layer}.num_batches_tracked"])


def assert_closed_form(path, x, batches):
    mean, var = closed_form(x)
    got_mean, got_var, nbt = written_stats(path)
    assert torch.all((got_mean - mean).abs() <= 1e-6 * var.sqrt())
    assert torch.allclose(got_var, var, rtol=1e-6, atol=0)
    assert nbt == batches


# --------------------------------------------------------------------------- --loader / --forward


def test_loader_of_dicts_with_a_forward(cli, workdir):
    tmp, x = workdir
    result = cli("recalibrate", "model.pt", "-m", "models_for_tests:pointwise", "--loader", "calib_loaders:dicts",
                 "--forward", "calib_loaders:forward", "-o", "out.pt")
    assert result.exit_code == 0, result
    assert "on 45 samples in 6 batches from --loader calib_loaders:dicts (cpu); wrote out.pt" in result.stdout
    assert_closed_form(tmp / "out.pt", x, 6)


def test_loader_of_pairs_uses_the_first_element(cli, workdir):
    tmp, x = workdir
    result = cli("recalibrate", "model.pt", "-m", "models_for_tests:pointwise", "--loader", "calib_loaders:pairs",
                 "-o", "out.pt", "-f", "json")
    assert result.exit_code == 0, result
    payload = json.loads(result.stdout)
    assert (payload["samples"], payload["batches"], payload["available"], payload["batch_size"]) == (45, 6, None, None)
    assert payload["loader"] == "calib_loaders:pairs" and payload["check"] is None
    assert_closed_form(tmp / "out.pt", x, 6)


def test_forward_with_data_files(cli, workdir):
    tmp, x = workdir
    (tmp / "fw.py").write_text("def double_call(model, batch):\n    model(batch[:4])\n    model(batch[4:])\n")
    result = cli("recalibrate", "model.pt", "-m", "models_for_tests:pointwise", "-d", "x.pt", "-b", "8",
                 "--forward", "fw:double_call", "-o", "out.pt")
    assert result.exit_code == 0, result
    assert_closed_form(tmp / "out.pt", x, 6)  # every value reached the layer once, in other pieces: same statistics


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loader", "calib_loaders:dicts"], "error: a batch of type dict is not a tensor or a tuple starting with one; "
         "say how it reaches the model with a forward function (--forward MODULE:FN, forward(model, batch))"),
        (["--loader", "calib_loaders:failing"], "error: --loader calib_loaders:failing: calling it raised OSError: no such bucket"),
        (["--loader", "calib_loaders:broken_iter"], "error: --loader calib_loaders:broken_iter: raised ValueError at batch 1: "
         "corrupt shard"),
        (["--loader", "calib_loaders:not_iterable"], "error: --loader calib_loaders:not_iterable: returned a int, not an "
         "iterable of batches"),
        (["--loader", "calib_loaders:nothing"], "error: --loader calib_loaders:nothing: 'calib_loaders' has no attribute 'nothing'"),
        (["--loader", "calib_loaders:pairs", "--forward", "calib_loaders:forward"], "error: --forward calib_loaders:forward: "
         "raised TypeError: tuple indices must be integers or slices, not str"),
    ],
)
def test_loader_and_forward_errors_are_input_errors(cli, workdir, args, message):
    tmp, _ = workdir
    result = cli("recalibrate", "model.pt", "-m", "models_for_tests:pointwise", *args, "-o", "out.pt")
    assert (result.exit_code, result.stderr) == (3, message + "\n")
    assert not (tmp / "out.pt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give the calibration data with --data PATH or --loader MODULE:FN (one of them)"),
        (["-d", "x.pt", "--loader", "calib_loaders:pairs"], "give the calibration data with --data PATH or --loader MODULE:FN (one of them)"),
        (["--loader", "calib_loaders:pairs", "-b", "8", "-n", "10"], "--batch-size, --num-samples apply to --data files; "
         "a --loader yields its own batches"),
        (["-d", "x.pt", "--check", "-o", "out.pt"], "--check writes nothing: use it without --output"),
        (["-d", "x.pt", "--check", "--max-var-ratio", "1"], "--max-var-ratio must be greater than 1 (a ratio r fails when "
         "r > it or r < 1/it); got 1"),
        (["-d", "x.pt", "--check", "--max-shift", "0"], "--max-shift must be greater than 0; got 0"),
    ],
)
def test_settings_that_cannot_work_together(cli, workdir, args, message):
    result = cli("recalibrate", "model.pt", "-m", "models_for_tests:pointwise", *args)
    assert (result.exit_code, result.stderr) == (2, f"error: {message}\n")


def test_output_or_check_is_required(cli, workdir):
    result = cli("recalibrate", "model.pt", "-m", "models_for_tests:pointwise", "-d", "x.pt")
    assert result.exit_code == 2
    assert result.stderr == "error: --output is required (or --check, to compare the statistics without writing)\n"


# --------------------------------------------------------------------------- --layers


def test_layers_re_estimates_only_the_matching_layers(cli, workdir):
    tmp, _ = workdir
    torch.save(models_for_tests.deep().state_dict(), tmp / "deep.pt")
    torch.save(torch.randn(20, 3, 8, 8), tmp / "img.pt")
    result = cli("recalibrate", "deep.pt", "-m", "models_for_tests:deep", "-d", "img.pt", "-b", "6", "--layers", "body.1",
                 "--layers", "head.*", "-o", "out.pt", "-f", "json")
    assert result.exit_code == 0, result
    verdicts = {x["name"]: x["verdict"] for x in json.loads(result.stdout)["diff"]["layers"]}
    assert verdicts == {"body.1": "changed", "body.5": "identical", "body.9": "identical", "head.1": "changed"}
    before, after = torch.load(tmp / "deep.pt", weights_only=True), torch.load(tmp / "out.pt", weights_only=True)
    for key in before:
        assert torch.equal(before[key], after[key]) == (not key.startswith(("body.1.running", "body.1.num", "head.1.running",
                                                                             "head.1.num"))), key
    # head.1 sees what the model computes with body.5 and body.9 in eval mode: the reference is the same model
    # with those two layers in eval mode, measured by the API (the same exact statistics as the CLI)
    import bncli

    model = models_for_tests.deep()
    model.load_state_dict(before)
    bncli.recalibrate(model, torch.load(tmp / "img.pt").split(6), layers=["body.1", "head.*"])
    assert torch.equal(model.state_dict()["head.1.running_var"], after["head.1.running_var"])


def test_layers_matching_nothing_is_an_input_error(cli, workdir):
    result = cli("recalibrate", "model.pt", "-m", "models_for_tests:pointwise", "-d", "x.pt", "--layers", "body.*", "-o", "o.pt")
    assert (result.exit_code, result.stderr) == (3, "error: --layers 'body.*' matches no BatchNorm layer of the model; layers: 1\n")


# --------------------------------------------------------------------------- --check


def calibrated(tmp, x):
    """model.pt with the closed-form statistics of x stored (float32), as a deployment checkpoint would hold."""
    sd = models_for_tests.pointwise().state_dict()
    mean, var = closed_form(x)
    sd["1.running_mean"], sd["1.running_var"] = mean.float(), var.float()
    torch.save(sd, tmp / "calibrated.pt")
    return mean, var


def listing(folder):
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())


def test_check_passes_when_the_statistics_fit(cli, workdir):
    tmp, x = workdir
    calibrated(tmp, x)
    files = listing(tmp)
    result = cli("recalibrate", "calibrated.pt", "-m", "models_for_tests:pointwise", "-d", "x.pt", "-b", "8", "--check")
    assert result.exit_code == 0, result
    assert "no checkpoint written" in result.stdout and "check passed" in result.stdout
    assert listing(tmp) == files


def test_check_mean_shift_on_both_sides_of_the_threshold(cli, workdir):
    tmp, x = workdir
    _, var = calibrated(tmp, x)
    delta = torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)
    torch.save((x.double() + delta.view(1, 3, 1, 1)).float(), tmp / "shifted.pt")
    expected = ((W @ delta).abs() / (var.float().double() + 1e-5).sqrt()).max().item()  # |W delta| / stored std
    args = ["recalibrate", "calibrated.pt", "-m", "models_for_tests:pointwise", "-d", "shifted.pt", "-b", "8", "--check"]
    result = cli(*args, "-f", "json", "--max-shift", f"{expected * 1.01}")
    assert result.exit_code == 0, result
    layer = json.loads(result.stdout)["diff"]["layers"][0]
    assert layer["max_shift"] == pytest.approx(expected, rel=1e-5)
    assert layer["var_ratio_min"] == pytest.approx(1.0, abs=1e-5) and layer["var_ratio_max"] == pytest.approx(1.0, abs=1e-5)
    failed = cli(*args, "-f", "json", "--max-shift", f"{expected * 0.99}")
    assert failed.exit_code == 1
    check = json.loads(failed.stdout)["check"]
    assert check == {"max_shift": pytest.approx(expected * 0.99), "max_var_ratio": 2.0, "passed": False, "failed": ["1"]}


def test_check_var_ratio_on_both_sides_of_the_threshold(cli, workdir):
    tmp, x = workdir
    calibrated(tmp, x)
    mu = x.double().mean(dim=(0, 2, 3), keepdim=True)
    torch.save((mu + 1.2 * (x.double() - mu)).float(), tmp / "wider.pt")  # same mean, every variance x 1.44
    args = ["recalibrate", "calibrated.pt", "-m", "models_for_tests:pointwise", "-d", "wider.pt", "-b", "8", "--check"]
    ok = cli(*args, "--max-var-ratio", "1.45", "-f", "json")
    assert ok.exit_code == 0, ok
    layer = json.loads(ok.stdout)["diff"]["layers"][0]
    assert layer["var_ratio_min"] == pytest.approx(1.44, rel=1e-5) and layer["var_ratio_max"] == pytest.approx(1.44, rel=1e-5)
    assert layer["max_shift"] < 1e-5
    assert cli(*args, "--max-var-ratio", "1.43").exit_code == 1
    # a narrower distribution: the ratio 1/1.44 fails against 1/R as well
    torch.save((mu + (x.double() - mu) / 1.2).float(), tmp / "narrower.pt")
    narrow = ["recalibrate", "calibrated.pt", "-m", "models_for_tests:pointwise", "-d", "narrower.pt", "-b", "8", "--check"]
    assert cli(*narrow, "--max-var-ratio", "1.43").exit_code == 1
    assert cli(*narrow, "--max-var-ratio", "1.45").exit_code == 0


def test_check_ranks_the_layers_that_drift_most_and_annotates_them(cli, workdir):
    tmp, _ = workdir
    model = models_for_tests.deep()
    torch.save(model.state_dict(), tmp / "deep.pt")  # never-updated statistics: every layer drifts
    torch.save(torch.randn(20, 3, 8, 8) * 3 + 2, tmp / "img.pt")
    args = ["recalibrate", "deep.pt", "-m", "models_for_tests:deep", "-d", "img.pt", "-b", "10", "--check"]
    result = cli(*args, "-f", "json")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    layers = payload["diff"]["layers"]

    import math

    def score(x):
        return max(x["max_shift"] / 0.5, max(abs(math.log(x["var_ratio_min"])), abs(math.log(x["var_ratio_max"]))) / math.log(2))

    assert [score(x) for x in layers] == sorted((score(x) for x in layers), reverse=True)
    assert payload["check"]["failed"] == [x["name"] for x in layers if score(x) > 1]
    assert payload["output"] is None
    table = cli(*args)
    assert table.stdout.splitlines()[2].startswith("check failed: ")
    github = cli(*args, "--format", "github").stdout.splitlines()
    errors = [line for line in github if line.startswith("::error ")]
    assert len(errors) == len(payload["check"]["failed"])
    assert errors[0].startswith(f"::error file=deep.pt,title=bncli recalibrate --check::{layers[0]['name']}: max mean shift ")
    assert not os.path.exists(tmp / "out.pt")
