"""`diff`: verdicts, per-channel metrics against independent formulas, prefix matching and the CI exit codes."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from conftest import SAMPLES, bn_state

from bncli.diff import diff_files


def two_layers(seed=0) -> OrderedDict:
    sd = bn_state(6, "features.1", seed=seed)
    sd.update(bn_state(4, "features.5", seed=seed + 1))
    return sd


def perturbed() -> tuple[OrderedDict, OrderedDict]:
    a = two_layers()
    b = OrderedDict((k, v.clone()) for k, v in a.items())
    b["features.5.running_mean"][[1, 3]] += torch.tensor([0.5, -2.0])
    b["features.5.running_var"][3] *= 4.0
    b["features.5.num_batches_tracked"] += 10
    return a, b


def test_identical_checkpoints(cli, make_ckpt):
    a = make_ckpt(two_layers(), "a.pt")
    b = make_ckpt({"state_dict": OrderedDict(("module." + k, v) for k, v in two_layers().items())}, "b.pt")
    report = diff_files(a, b)
    assert [x.verdict for x in report.layers] == ["identical", "identical"]
    assert report.changed == () and report.unchanged == ("features.1", "features.5")
    assert report.prefix_b == "module."
    layer = report.layers[0]
    assert (layer.max_shift, layer.var_ratio_min, layer.var_ratio_max, layer.mean_kl) == (0.0, 1.0, 1.0, 0.0)
    assert layer.batches_change == 0 and layer.weight_max_change == 0.0
    assert cli("diff", a, b).exit_code == 0
    assert cli("diff", a, b, "--fail-on-change").exit_code == 0
    result = cli("diff", a, b, "--fail-if-unchanged")
    assert result.exit_code == 1
    assert result.stderr.strip() == "--fail-if-unchanged: 2 BatchNorm layers unchanged: features.1, features.5"


def test_perturbed_layer_and_channels(cli, make_ckpt):
    a_sd, b_sd = perturbed()
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    report = diff_files(a, b)
    first, second = report.layers
    assert first.verdict == "identical"
    assert second.verdict == "changed" and second.changed_channels == (1, 3)
    assert second.batches_change == 10

    eps = 1e-5
    ma, mb = a_sd["features.5.running_mean"].double(), b_sd["features.5.running_mean"].double()
    va, vb = a_sd["features.5.running_var"].double(), b_sd["features.5.running_var"].double()
    shift = (mb - ma).abs() / (va + eps).sqrt()
    assert second.max_shift == pytest.approx(shift.max().item(), rel=1e-12)
    assert second.var_ratio_max == pytest.approx((vb / va).max().item(), rel=1e-12)
    assert second.var_ratio_min == pytest.approx(1.0)
    # The symmetric KL from torch.distributions, an independent implementation.
    pa = torch.distributions.Normal(ma, (va + eps).sqrt())
    pb = torch.distributions.Normal(mb, (vb + eps).sqrt())
    kl = torch.distributions.kl_divergence(pa, pb) + torch.distributions.kl_divergence(pb, pa)
    assert second.mean_kl == pytest.approx(kl.mean().item(), rel=1e-9)

    assert cli("diff", a, b).exit_code == 0
    assert cli("diff", a, b, "--fail-if-unchanged").exit_code == 1  # features.1 was not updated
    result = cli("diff", a, b, "--fail-on-change")
    assert result.exit_code == 1
    assert result.stderr.strip() == "--fail-on-change: 1 BatchNorm layer changed: features.5"
    assert cli("diff", a, b, "--layer", "features.5", "--fail-if-unchanged").exit_code == 0


def test_layer_view_json(cli, make_ckpt):
    a_sd, b_sd = perturbed()
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    result = cli("diff", a, b, "--layer", "features.5", "--format", "json")
    assert result.exit_code == 0, result
    payload = json.loads(result.stdout)
    assert payload["schema_version"] == 1
    (layer,) = payload["layers"]
    assert [c["changed"] for c in layer["channels"]] == [False, True, False, True]
    assert layer["channels"][1]["mean_b"] - layer["channels"][1]["mean_a"] == pytest.approx(0.5, abs=1e-6)
    assert layer["channels"][3]["var_ratio"] == pytest.approx(4.0)
    table = cli("diff", a, b, "--layer", "features.5")
    assert "layer features.5, channel by channel" in table.stdout
    missing = cli("diff", a, b, "--layer", "features.9")
    assert missing.exit_code == 2
    assert missing.stderr.strip() == f"error: {a}: no BatchNorm layer named 'features.9'; nearest: features.1, features.5"


def test_only_in_one_side_and_shape_changed(cli, make_ckpt):
    a_sd = two_layers()
    b_sd = bn_state(8, "features.1")  # 6 -> 8 channels
    b_sd.update(bn_state(3, "head.bn"))
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    report = diff_files(a, b)
    assert [(x.name, x.verdict) for x in report.layers] == [("features.1", "shape-changed")]
    assert report.only_a == ("features.5",) and report.only_b == ("head.bn",)
    result = cli("diff", a, b, "--fail-on-change")
    assert result.exit_code == 1
    assert "6→8" in result.stdout and "only in A: features.5" in result.stdout and "only in B: head.bn" in result.stdout
    assert "1 layer in both: 0 changed, 1 shape-changed, 0 identical; 1 only in A, 1 only in B" in result.stdout
    md = cli("diff", a, b, "--format", "markdown")
    assert md.exit_code == 0
    assert "| `features.1` | 6→8 | shape-changed | - | - | - | - | +0 | - | - |" in md.stdout
    assert "Only in A: `features.5`" in md.stdout


def test_nan_stays_visible_and_unchanged_nan_is_not_a_change(make_ckpt):
    a_sd = two_layers()
    a_sd["features.1.running_var"][2] = float("nan")
    b_sd = OrderedDict((k, v.clone()) for k, v in a_sd.items())
    report = diff_files(make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt"))
    assert report.layers[0].verdict == "identical"
    b_sd["features.1.running_var"][4] = -1.0
    report = diff_files(make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt"), layer="features.1")
    layer = report.layers[0]
    assert layer.changed_channels == (4,)
    assert layer.var_ratio_max != layer.var_ratio_max  # nan: channel 2 is broken in both
    assert layer.channels[4].kl != layer.channels[4].kl  # no Gaussian has a negative variance


def test_zero_variance_channels_are_counted_not_nan(cli, make_ckpt):
    """A dead or pruned channel (running_var == 0 in both files) leaves an identical layer without a NaN."""
    a_sd = two_layers()
    a_sd["features.1.running_var"][[1, 4]] = 0.0
    b_sd = OrderedDict((k, v.clone()) for k, v in a_sd.items())
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    same = diff_files(a, b, layer="features.1").layers[0]
    assert same.verdict == "identical" and same.zero_var_channels == 2
    assert (same.max_shift, same.var_ratio_min, same.var_ratio_max, same.mean_kl) == (0.0, 1.0, 1.0, 0.0)
    assert [c.var_ratio for c in same.channels] == [1.0] * 6 and [c.kl for c in same.channels] == [0.0] * 6
    for eps in ("1e-5", "0"):  # with eps 0 the channel is a point mass, and still equal to itself
        table = cli("diff", a, b, "--eps", eps)
        assert table.exit_code == 0, table
        assert "nan" not in table.stdout and "zero var = channels with var 0 in A or B" in table.stdout
        row = next(line for line in table.stdout.splitlines() if line.startswith("features.1"))
        assert row.split("│")[6].strip() == "2"  # the zero var column
        md = cli("diff", a, b, "--eps", eps, "--format", "markdown").stdout
        assert "| zero var |" in md and "| `features.1` | 6 | identical | 0 | 1 | 1 | 2 | 0 | +0 | 0 | 0 |" in md
    # Now B changes: channel 0 drops to zero variance, channel 2 is doubled; channels 1 and 4 stay at zero.
    b_sd["features.1.running_var"][0] = 0.0
    b_sd["features.1.running_var"][2] *= 2.0
    va, vb = a_sd["features.1.running_var"].double(), b_sd["features.1.running_var"].double()
    changed = diff_files(a, make_ckpt(b_sd, "b2.pt"), layer="features.1").layers[0]
    assert changed.zero_var_channels == 3
    both_positive = (va > 0) & (vb > 0)
    assert changed.var_ratio_max == pytest.approx((vb / va)[both_positive].max().item(), rel=1e-12)
    assert changed.var_ratio_max == pytest.approx(2.0)
    assert changed.var_ratio_min == 1.0
    assert changed.channels[0].var_ratio == 0.0  # 0 / positive: a number, not NaN
    # The KL against N(m, 0 + eps), the variance BatchNorm divides by, from torch.distributions.
    eps = 1e-5
    pa = torch.distributions.Normal(a_sd["features.1.running_mean"].double(), (va + eps).sqrt())
    pb = torch.distributions.Normal(b_sd["features.1.running_mean"].double(), (vb + eps).sqrt())
    kl = torch.distributions.kl_divergence(pa, pb) + torch.distributions.kl_divergence(pb, pa)
    assert [c.kl for c in changed.channels] == pytest.approx(kl.tolist(), rel=1e-9)
    point = diff_files(a, make_ckpt(b_sd, "b2.pt"), layer="features.1", eps=0.0).layers[0]
    assert point.channels[0].kl == float("inf") and point.channels[1].kl == 0.0  # a point mass vs a Gaussian; vs itself
    assert point.mean_kl == float("inf")


def test_no_zero_variance_no_column(cli, make_ckpt):
    a = make_ckpt(two_layers(), "a.pt")
    table = cli("diff", a, a)
    assert "zero var" not in table.stdout and "zero\n" not in table.stdout and diff_files(a, a).layers[0].zero_var_channels == 0


@pytest.mark.parametrize("negative", [-5e-6, -0.5])
def test_negative_variance_gives_no_kl_and_no_ratio(make_ckpt, negative):
    """A negative running_var (inspect's BN002) is no variance: NaN, even when var + eps is positive."""
    a_sd = two_layers()
    b_sd = OrderedDict((k, v.clone()) for k, v in a_sd.items())
    b_sd["features.1.running_var"][3] = negative
    layer = diff_files(make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt"), layer="features.1").layers[0]
    ch = layer.channels[3]
    assert math.isnan(ch.kl) and math.isnan(ch.var_ratio) and ch.shift == 0.0  # the mean did not move
    assert math.isnan(layer.mean_kl) and math.isnan(layer.var_ratio_min) and math.isnan(layer.var_ratio_max)
    assert layer.zero_var_channels == 0
    assert all(math.isfinite(c.kl) for i, c in enumerate(layer.channels) if i != 3)
    # On A's side the shift has no std to be measured in either.
    back = diff_files(make_ckpt(b_sd, "b.pt"), make_ckpt(a_sd, "a.pt"), layer="features.1").layers[0]
    assert math.isnan(back.channels[3].shift) and math.isnan(back.max_shift)


def test_json_says_which_non_finite(cli, make_ckpt):
    a_sd = two_layers()
    a_sd["features.1.running_var"][1] = 0.0
    b_sd = OrderedDict((k, v.clone()) for k, v in a_sd.items())
    b_sd["features.1.running_var"][[1, 3]] = torch.tensor([2.0, -0.5])  # 0 -> 2: KL Inf with eps 0; negative: NaN
    a, b = make_ckpt(a_sd, "a.pt"), make_ckpt(b_sd, "b.pt")
    result = cli("diff", a, b, "--eps", "0", "--layer", "features.1", "--format", "json")
    assert result.exit_code == 0, result
    (layer,) = json.loads(result.stdout)["layers"]
    assert layer["mean_kl"] is None and layer["non_finite"] == {"var_ratio_min": "nan", "var_ratio_max": "nan",
                                                                 "mean_kl": "nan"}
    ch1, ch3 = layer["channels"][1], layer["channels"][3]
    assert ch1["kl"] is None and ch1["var_ratio"] is None and ch1["non_finite"] == {"var_ratio": "inf", "kl": "inf"}
    assert ch3["non_finite"] == {"var_ratio": "nan", "kl": "nan"}
    assert "non_finite" not in layer["channels"][0]


def test_both_flags_is_a_usage_error(cli):
    result = cli("diff", SAMPLES / "model.pt", SAMPLES / "model.safetensors", "--fail-on-change", "--fail-if-unchanged")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --fail-on-change and --fail-if-unchanged cannot be used together"


def test_sample_data(cli):
    same = cli("diff", SAMPLES / "model.pt", SAMPLES / "model.safetensors", "--fail-on-change")
    assert same.exit_code == 0 and "3 identical" in same.stdout
    broken = diff_files(SAMPLES / "model.safetensors", SAMPLES / "model_defects.safetensors")
    assert {x.name: x.changed_channels for x in broken.layers} == {
        "features.1": tuple(range(16)),
        "features.5": (3, 7, 11),
        "features.9": (0, 2, 4, 5),
    }
    assert broken.layers[0].batches_change == -256


def test_missing_file(cli, tmp_path):
    result = cli("diff", SAMPLES / "model.pt", tmp_path / "nope.pt")
    assert result.exit_code == 3
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.pt'}: no such file"


def test_help_does_not_import_torch():
    import subprocess
    import sys

    from conftest import ROOT

    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom bncli.cli import app\n"
        "for cmd in ('diff', 'recalibrate'):\n    assert CliRunner().invoke(app, [cmd, '--help']).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_format_has_a_renderer(make_ckpt):
    from bncli.render import Format, renderer_for
    from bncli.render.diff import diff_github

    a_sd, b_sd = perturbed()
    b = make_ckpt(b_sd, "b.pt")
    report = diff_files(make_ckpt(a_sd, "a.pt"), b)
    for fmt in Format:
        if fmt.value in ("table", "json", "markdown", "github"):
            assert renderer_for(fmt, "diff")(report) is not None
            assert renderer_for(fmt, "recalibrate") is not None
    lines = diff_github(report).splitlines()
    assert lines[0].startswith(f"::notice file={b},title=bncli diff::features.5: changed (2 of 4 channels; max mean shift ")
    assert lines[-1] == "2 layers in both: 1 changed, 0 shape-changed, 1 identical; 0 only in A, 0 only in B"


def test_lightning_checkpoint_against_a_plain_one(cli, make_ckpt):
    plain = make_ckpt(two_layers(), "a.pt")
    lightning = make_ckpt({"state_dict": OrderedDict(("model." + k, v) for k, v in two_layers().items()), "epoch": 3}, "l.ckpt")
    unmatched = diff_files(plain, lightning)
    assert unmatched.layers == () and unmatched.only_b == ("model.features.1", "model.features.5")
    report = diff_files(plain, lightning, strip_prefix_b="model")
    assert [x.verdict for x in report.layers] == ["identical", "identical"] and report.prefix_b == "model."
    assert cli("diff", plain, lightning, "--strip-prefix-b", "model.", "--fail-on-change").exit_code == 0
    both = cli("diff", lightning, lightning, "--strip-prefix", "model", "--fail-if-unchanged")
    assert both.stderr.strip() == "--fail-if-unchanged: 2 BatchNorm layers unchanged: features.1, features.5"
    wrong = cli("diff", plain, lightning, "--strip-prefix", "model")
    assert wrong.exit_code == 3
    assert wrong.stderr.strip() == (
        f"error: {plain}: cannot strip prefix 'model': only 0 of 10 keys start with it (not 'features.1.weight')"
    )
    clash = cli("diff", plain, lightning, "--strip-prefix", "model", "--strip-prefix-b", "model")
    assert clash.exit_code == 2
    assert clash.stderr.strip() == "error: --strip-prefix applies to both files: use it without --strip-prefix-a/--strip-prefix-b"


def test_usage_errors_are_public_and_shared():
    from bncli.commands import diff, normalize, options
    from bncli.errors import BncliError, ExitCode, UsageError
    from bncli.render import UnsupportedFormat

    assert issubclass(UsageError, BncliError) and UsageError.exit_code == ExitCode.USAGE
    assert issubclass(UnsupportedFormat, UsageError)
    assert diff.check_eps is normalize.check_eps is options.check_eps


def test_eps_help_says_both_variances(cli):
    text = " ".join(cli("diff", "--help").stdout.split())
    assert "Added to var_A in the mean shift, and to var_A and var_B in the KL." in text
