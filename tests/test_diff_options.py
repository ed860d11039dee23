"""diff's options for freezing and EMA workflows: --only/--exclude, --atol/--rtol, --state-a/--state-b, github gates."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import bn_state

from bncli.diff import diff_files


def model(seed: int = 0) -> OrderedDict:
    sd = bn_state(4, "backbone.bn1", seed=seed)
    sd.update(bn_state(4, "backbone.bn2", seed=seed + 1))
    sd.update(bn_state(4, "head.bn", seed=seed + 2))
    return sd


def moved_head() -> tuple[OrderedDict, OrderedDict]:
    a = model()
    b = OrderedDict((k, v.clone()) for k, v in a.items())
    b["head.bn.running_mean"][2] += 0.5
    return a, b


def names(result) -> list[str]:
    return [x["name"] for x in json.loads(result.stdout)["layers"]]


# --------------------------------------------------------------------------- --only / --exclude


def test_frozen_backbone_moved_head(cli, make_ckpt):
    a_sd, b_sd = moved_head()
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    assert cli("diff", a, b, "--fail-on-change").exit_code == 1
    frozen = cli("diff", a, b, "--only", "backbone.*", "--fail-on-change", "-f", "json")
    assert frozen.exit_code == 0, frozen
    assert names(frozen) == ["backbone.bn1", "backbone.bn2"]
    assert cli("diff", a, b, "--exclude", "head.*", "--fail-on-change").exit_code == 0
    moved = cli("diff", a, b, "--only", "head.*", "--fail-if-unchanged")
    assert moved.exit_code == 0, moved


def test_only_and_exclude_repeat_and_combine(cli, make_ckpt):
    a_sd, b_sd = moved_head()
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    result = cli("diff", a, b, "--only", "backbone.bn1", "--only", "head.*", "-f", "json")
    assert names(result) == ["backbone.bn1", "head.bn"]
    result = cli("diff", a, b, "--only", "*.bn?", "--exclude", "*bn2", "--exclude", "head.bn", "-f", "json")
    assert names(result) == ["backbone.bn1"]
    # layers present on one side only are filtered too
    del b_sd["head.bn.running_mean"], b_sd["head.bn.running_var"]
    b = make_ckpt(b_sd, "b2.pt")
    payload = json.loads(cli("diff", a, b, "--exclude", "head.*", "-f", "json").stdout)
    assert payload["only_a"] == [] and payload["summary"]["layers"] == 2


def test_a_pattern_that_matches_nothing_is_an_input_error(cli, make_ckpt):
    a = make_ckpt(model(), "a.pt")
    result = cli("diff", a, a, "--only", "backbon.*", "--fail-on-change")
    assert result.exit_code == 3
    assert result.stderr == (
        "error: --only 'backbon.*' matches no BatchNorm layer of A or B; layers: backbone.bn1, backbone.bn2, head.bn\n"
    )
    assert cli("diff", a, a, "--exclude", "nothing").exit_code == 3
    both = cli("diff", a, a, "--only", "head.*", "--layer", "head.bn")
    assert (both.exit_code, both.stderr) == (2, "error: --layer picks one layer: use it without --only/--exclude\n")


# --------------------------------------------------------------------------- --atol / --rtol


def one_layer(mean, var, weight=None) -> OrderedDict:
    sd = OrderedDict()
    if weight is not None:
        sd["bn.weight"] = torch.tensor(weight, dtype=torch.float32)
        sd["bn.bias"] = torch.zeros(len(weight))
    sd["bn.running_mean"] = torch.tensor(mean, dtype=torch.float32)
    sd["bn.running_var"] = torch.tensor(var, dtype=torch.float32)
    sd["bn.num_batches_tracked"] = torch.tensor(10)
    return sd


def test_atol_on_both_sides_with_exact_binary_steps(make_ckpt):
    d = 2.0**-20  # exactly representable: |B - A| is d exactly
    a = make_ckpt(one_layer([1.0, 0.5], [2.0, 3.0]), "a.pt")
    b = make_ckpt(one_layer([1.0 + d, 0.5], [2.0, 3.0]), "b.pt")
    assert diff_files(a, b).layers[0].verdict == "changed"
    assert diff_files(a, b, atol=d / 2).layers[0].changed_channels == (0,)
    within = diff_files(a, b, atol=d).layers[0]
    assert within.verdict == "identical" and within.changed_channels == ()
    assert within.max_shift == pytest.approx(d / np.sqrt(2.0 + 1e-5), rel=1e-12)  # metrics are still reported


def test_rtol_is_relative_to_a(make_ckpt):
    a = make_ckpt(one_layer([0.1, 0.2], [4.0, 1.0]), "a.pt")
    b = make_ckpt(one_layer([0.1, 0.2], [4.0 + 2.0**-18, 1.0]), "b.pt")  # |B - A| = 2^-18 = 2^-20 * |A|
    assert diff_files(a, b, rtol=2.0**-21).layers[0].verdict == "changed"
    assert diff_files(a, b, rtol=2.0**-20).layers[0].verdict == "identical"
    # atol and rtol add up: 2^-19 + 2^-21 * 4 = 2^-18
    assert diff_files(a, b, atol=2.0**-19, rtol=2.0**-21).layers[0].verdict == "identical"
    assert diff_files(a, b, atol=2.0**-20, rtol=2.0**-21).layers[0].verdict == "changed"


def test_tolerance_covers_weight_and_bias_but_not_the_batch_count(make_ckpt):
    a_sd = one_layer([0.1], [1.0], weight=[1.0])
    b_sd = one_layer([0.1], [1.0], weight=[1.0 + 2.0**-20])
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    assert diff_files(a, b).layers[0].verdict == "changed"
    assert diff_files(a, b, atol=2.0**-20).layers[0].verdict == "identical"
    b_sd["bn.num_batches_tracked"] = torch.tensor(11)
    assert diff_files(a, make_ckpt(b_sd, "c.pt"), atol=1.0).layers[0].verdict == "changed"


def test_a_float16_round_trip_is_identical_within_its_precision(cli, make_ckpt):
    a_sd = model()
    half = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in a_sd.items())
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(half, "b.pt")
    assert cli("diff", a, b, "--fail-on-change").exit_code == 1
    assert cli("diff", a, b, "--fail-on-change", "--rtol", "4.9e-4").exit_code == 0  # float16 rounds within 2^-11
    result = cli("diff", a, b, "--rtol", "4.9e-4", "-f", "json")
    assert (json.loads(result.stdout)["atol"], json.loads(result.stdout)["rtol"]) == (0.0, 4.9e-4)
    assert "(eps=1e-05, atol=0, rtol=0.00049)" in cli("diff", a, b, "--rtol", "4.9e-4").stdout


def test_nan_is_never_within_a_tolerance(make_ckpt):
    a = make_ckpt(one_layer([0.1, 0.2], [1.0, 1.0]), "a.pt")
    b = make_ckpt(one_layer([float("nan"), 0.2], [1.0, float("inf")]), "b.pt")
    assert diff_files(a, b, atol=1e30).layers[0].changed_channels == (0, 1)


@pytest.mark.parametrize("value", ["-1e-6", "nan", "inf"])
def test_bad_tolerance_is_a_usage_error(cli, make_ckpt, value):
    a = make_ckpt(model(), "a.pt")
    result = cli("diff", a, a, "--atol", value)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --atol must be a finite number >= 0; got ")


# --------------------------------------------------------------------------- --state-a / --state-b


def test_model_against_its_ema_in_one_file(cli, make_ckpt):
    sd = model()
    ema = OrderedDict((k, v.clone()) for k, v in sd.items())
    ema["backbone.bn1.running_mean"] = sd["backbone.bn1.running_mean"] + 0.25
    ema["backbone.bn1.running_var"] = sd["backbone.bn1.running_var"] * 2.0
    path = make_ckpt({"model": sd, "model_ema": ema, "epoch": 3}, "ckpt.pt")
    report = diff_files(path, path, state_a="model", state_b="model_ema")
    assert [x.verdict for x in report.layers] == ["changed", "identical", "identical"]
    first = report.layers[0]
    va = sd["backbone.bn1.running_var"].double()
    vb = ema["backbone.bn1.running_var"].double()
    mb = ema["backbone.bn1.running_mean"].double()
    assert first.max_shift == pytest.approx(((mb - sd["backbone.bn1.running_mean"].double()).abs() / (va + 1e-5).sqrt()).max().item(),
                                            rel=1e-9)
    assert first.var_ratio_min == pytest.approx((vb / va).min().item(), rel=1e-12)
    assert (report.container_a, report.container_b) == ("model", "model_ema")
    # an EMA whose BatchNorm buffers were never averaged: --fail-if-unchanged catches it
    result = cli("diff", path, path, "--state-a", "model", "--state-b", "model_ema", "--fail-if-unchanged")
    assert result.exit_code == 1
    assert result.stderr.strip() == "--fail-if-unchanged: 2 BatchNorm layers unchanged: backbone.bn2, head.bn"
    assert result.stdout.startswith(f"A = {path} [model]   B = {path} [model_ema]   (eps=1e-05)")
    payload = json.loads(cli("diff", path, path, "--state-a", "model", "--state-b", "model_ema", "-f", "json").stdout)
    assert payload["a"]["container"] == "model" and payload["b"]["container"] == "model_ema"


def test_state_with_state_a_is_a_usage_error_and_a_missing_key_an_input_error(cli, make_ckpt):
    path = make_ckpt({"model": model(), "model_ema": model()}, "ckpt.pt")
    both = cli("diff", path, path, "--state", "model", "--state-b", "model_ema")
    assert (both.exit_code, both.stderr) == (2, "error: --state applies to both files: use it without --state-a/--state-b\n")
    missing = cli("diff", path, path, "--state-a", "model", "--state-b", "ema")
    assert missing.exit_code == 3 and missing.stderr.startswith("error: ")
    assert missing.stderr.count("\n") == 1


# --------------------------------------------------------------------------- --format github gates


def test_github_fail_on_change_is_an_error_on_file_b(cli, make_ckpt):
    a_sd, b_sd = moved_head()
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    result = cli("diff", a, b, "--fail-on-change", "--format", "github")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"::error file={b},title=bncli diff --fail-on-change::head.bn: changed (1 of 4 channels; ")
    assert lines[1:] == ["3 layers in both: 1 changed, 0 shape-changed, 2 identical; 0 only in A, 0 only in B"]
    assert result.stderr.strip() == "--fail-on-change: 1 BatchNorm layer changed: head.bn"
    # the same diff without a gate: a notice, still on file B
    plain = cli("diff", a, b, "--format", "github").stdout.splitlines()
    assert plain[0].startswith(f"::notice file={b},title=bncli diff::head.bn: changed")


def test_github_fail_if_unchanged_marks_the_identical_layers(cli, make_ckpt):
    a_sd, b_sd = moved_head()
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "run,1:b.pt")
    result = cli("diff", a, b, "--fail-if-unchanged", "--format", "github")
    assert result.exit_code == 1
    escaped = str(b).replace(",", "%2C").replace(":", "%3A")
    assert result.stdout.splitlines()[:3] == [
        f"::error file={escaped},title=bncli diff --fail-if-unchanged::backbone.bn1: identical",
        f"::error file={escaped},title=bncli diff --fail-if-unchanged::backbone.bn2: identical",
        result.stdout.splitlines()[2],
    ]
    assert result.stdout.splitlines()[2].startswith(f"::notice file={escaped},title=bncli diff --fail-if-unchanged::head.bn: changed")


def test_github_gate_passed_has_no_error(cli, make_ckpt):
    a_sd, b_sd = moved_head()
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    result = cli("diff", a, b, "--only", "backbone.*", "--fail-on-change", "--format", "github")
    assert result.exit_code == 0
    assert result.stdout == "2 layers in both: 0 changed, 0 shape-changed, 2 identical; 0 only in A, 0 only in B\n"


def test_github_fail_if_unchanged_without_common_layers(cli, make_ckpt):
    a = make_ckpt(bn_state(4, "x"), "a.pt")
    b = make_ckpt(bn_state(4, "y"), "b.pt")
    result = cli("diff", a, b, "--fail-if-unchanged", "--format", "github")
    assert result.exit_code == 1
    assert (f"::error file={b},title=bncli diff --fail-if-unchanged::--fail-if-unchanged: no BatchNorm layer is in both "
            "checkpoints") in result.stdout.splitlines()


def test_json_gate(cli, make_ckpt):
    a_sd, b_sd = moved_head()
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    payload = json.loads(cli("diff", a, b, "--fail-on-change", "-f", "json").stdout)
    assert payload["gate"] == {"option": "fail-on-change", "failed": True, "layers": ["head.bn"]}
    assert json.loads(cli("diff", a, b, "-f", "json").stdout)["gate"] is None
