"""`bncli normalize` against nn.BatchNorm2d itself and against the float64 formula."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLES, bn_state
from torch import nn

from bncli.normalize import normalize


def _reference(x, mode, *, eps=1e-5, momentum=0.1, affine=True, state=None):
    bn = nn.BatchNorm2d(x.shape[1], eps=eps, momentum=momentum, affine=affine)
    if state is not None:
        bn.load_state_dict(state)
    bn.train(mode == "train")
    with torch.no_grad():
        y = bn(x)
    return y, bn


def _save(tmp_path, tensor, name="x.pt"):
    path = tmp_path / name
    torch.save(tensor, path)
    return path


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine", [True, False])
def test_fresh_layer_matches_module(tmp_path, mode, momentum, affine):
    x = torch.randn(6, 5, 7, 3, generator=torch.Generator().manual_seed(1)) * 3 + 2
    path = _save(tmp_path, x)
    out = tmp_path / "y.pt"
    report = normalize(path, mode=mode, momentum=momentum, affine=affine, output=out)
    y_ref, bn = _reference(x, mode, momentum=momentum, affine=affine)
    y = torch.load(out, weights_only=True)
    assert y.shape == x.shape
    assert torch.allclose(y, y_ref, atol=1e-6, rtol=0)
    assert [c.running_mean for c in report.channels] == pytest.approx(bn.running_mean.tolist(), rel=1e-6, abs=1e-7)
    assert [c.running_var for c in report.channels] == pytest.approx(bn.running_var.tolist(), rel=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_checkpoint_layer_matches_module(tmp_path, make_ckpt, mode):
    state = bn_state(channels=4, prefix="stage.2")
    ckpt = make_ckpt({"state_dict": {f"module.{k}": v for k, v in state.items()}})
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    path = _save(tmp_path, x)
    out = tmp_path / "y.safetensors"
    report = normalize(path, mode=mode, checkpoint=ckpt, layer="stage.2", eps=1e-3, momentum=0.2, output=out)
    plain = {k.removeprefix("stage.2."): v for k, v in state.items()}
    y_ref, bn = _reference(x, mode, eps=1e-3, momentum=0.2, state=plain)
    from safetensors.torch import load_file

    y = load_file(out)["output"]
    assert torch.allclose(y, y_ref, atol=1e-6, rtol=0)
    assert [c.running_var for c in report.channels] == pytest.approx(bn.running_var.tolist(), rel=1e-6)
    assert report.layer_source.endswith(":stage.2")


def test_statistics_match_float64_formula(tmp_path):
    x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1)
    report = normalize(_save(tmp_path, x), mode="train")
    x64 = x.double().numpy()
    y_ref, _ = _reference(x, "train")
    y64 = y_ref.double().numpy()
    for c, row in enumerate(report.channels):
        values, out = x64[:, c].ravel(), y64[:, c].ravel()
        # The target (issue 5): relative error below 1e-6, the mean's taken against the channel's spread.
        assert abs(row.input_mean - values.mean()) <= 1e-6 * values.std()
        assert row.input_std == pytest.approx(values.std(ddof=1), rel=1e-6)
        assert row.output_mean == pytest.approx(out.mean(), abs=1e-7)
        assert row.output_std == pytest.approx(out.std(ddof=1), rel=1e-6)
        # Train mode normalizes with the biased variance, so the corrected std of the output is sqrt(n/(n-1)).
        n = values.size
        assert row.output_std == pytest.approx(np.sqrt(n / (n - 1)) * np.sqrt(values.var() / (values.var() + 1e-5)), rel=1e-5)


def test_channels_last_and_batch_dim_round_trip(tmp_path):
    x = torch.randn(2, 6, 6, 3, generator=torch.Generator().manual_seed(4))
    out = tmp_path / "y.pt"
    normalize(_save(tmp_path, x), channels_last=True, output=out)
    y_ref, _ = _reference(x.permute(0, 3, 1, 2), "train")
    y = torch.load(out, weights_only=True)
    assert y.shape == x.shape  # written back in the input's own layout
    assert torch.allclose(y, y_ref.permute(0, 2, 3, 1), atol=1e-6, rtol=0)

    single = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(5))
    normalize(_save(tmp_path, single, "one.pt"), add_batch_dim=True, output=out)
    y_ref, _ = _reference(single.unsqueeze(0), "train")
    assert torch.allclose(torch.load(out, weights_only=True), y_ref.squeeze(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes(tmp_path, dtype):
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(6)).to(dtype)
    report = normalize(_save(tmp_path, x), mode="train")
    assert report.dtype == str(dtype).removeprefix("torch.")
    ref = x.double().numpy()
    tol = {torch.float64: 1e-12, torch.float16: 1e-6, torch.bfloat16: 1e-6}[dtype]
    for c, row in enumerate(report.channels):
        assert row.input_mean == pytest.approx(ref[:, c].mean(), rel=tol, abs=tol)


def test_cli_table_and_json(cli, tmp_path):
    result = cli("normalize", SAMPLES / "input.pt")
    assert result.exit_code == 0, result
    assert "in mean" in result.stdout and "running_var" in result.stdout
    assert "correction=1" in result.stdout

    result = cli("normalize", SAMPLES / "input.pt", "--format", "json", "--mode", "eval")
    assert result.exit_code == 0, result
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    assert set(data) >= {"input", "mode", "eps", "momentum", "channels", "output"}
    assert set(data["input"]) >= {"path", "shape", "dtype"}
    assert data["input"]["shape"] == [8, 3, 16, 16]
    assert set(data["channels"][0]) >= {"index", "input_mean", "input_std", "output_mean", "output_std", "running_mean", "running_var"}
    x = torch.load(SAMPLES / "input.pt", weights_only=True).double()
    assert data["channels"][1]["input_std"] == pytest.approx(x[:, 1].std().item(), rel=1e-6)
    # eval with a fresh layer: said plainly, on stderr
    assert "running statistics are the defaults" in result.stderr


def test_cli_key_selects_tensor(cli):
    result = cli("normalize", SAMPLES / "inputs.safetensors", "--key", "images", "-f", "json")
    assert result.exit_code == 0, result
    assert json.loads(result.stdout)["input"]["key"] == "images"


def test_cli_writes_output_atomically(cli, tmp_path):
    out = tmp_path / "out.pt"
    result = cli("normalize", SAMPLES / "input.npy", "--output", out)
    assert result.exit_code == 0, result
    assert out.exists() and [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_checkpoint_layer_from_sample(cli):
    result = cli("normalize", SAMPLES / "activations.pt", "-m", "eval", "-c", SAMPLES / "model.pt", "-l", "features.1", "-f", "json")
    assert result.exit_code == 0, result
    data = json.loads(result.stdout)
    assert data["layer"].endswith("model.pt:features.1")
    assert len(data["channels"]) == 16
    assert result.stderr == ""


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_other_float_dtypes_match_the_module(tmp_path, dtype, mode):
    x = (torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(7)) * 2 + 1).to(dtype)
    out = tmp_path / "y.pt"
    report = normalize(_save(tmp_path, x), mode=mode, output=out)
    bn = nn.BatchNorm2d(3).to(torch.float64 if dtype == torch.float64 else torch.float32)
    bn.train(mode == "train")
    with torch.no_grad():
        y_ref = bn(x)
    y = torch.load(out, weights_only=True)
    assert y.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]  # an ulp of the dtype at |y| ~ 2
    assert torch.allclose(y.double(), y_ref.double(), atol=tol, rtol=0)
    assert [c.running_var for c in report.channels] == pytest.approx(bn.running_var.tolist(), rel=1e-6)
    y64 = y.double().numpy()
    for c, row in enumerate(report.channels):
        assert row.output_std == pytest.approx(y64[:, c].std(ddof=1), rel=1e-6)


def test_layer_with_bias_but_no_weight_keeps_its_bias(tmp_path, make_ckpt):
    state = bn_state(channels=3, prefix="bn")
    del state["bn.weight"]
    ckpt = make_ckpt(state)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    out = tmp_path / "y.pt"
    normalize(_save(tmp_path, x), mode="eval", checkpoint=ckpt, layer="bn", output=out)
    bn = nn.BatchNorm2d(3).eval()
    bn.load_state_dict({k.removeprefix("bn."): v for k, v in state.items()}, strict=False)  # weight stays 1
    with torch.no_grad():
        assert torch.allclose(torch.load(out, weights_only=True), bn(x), atol=1e-6, rtol=0)


def test_stdout_errors(tmp_path):
    """A full disk on stdout is one error line and exit 3; a reader that leaves early (| head) is no error."""
    import subprocess
    import sys

    from conftest import ROOT

    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "bncli", "inspect", str(SAMPLES / "model.pt"), "-f", "json"],
                              cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 3 and proc.stderr == "error: cannot write the report to stdout (No space left on device)\n"
    head = subprocess.run(f"{sys.executable} -m bncli inspect {SAMPLES / 'model_defects.pt'} --layer features.9 | head -1",
                          shell=True, cwd=ROOT, capture_output=True, text=True, executable="/bin/bash")
    assert head.stdout.startswith(str(SAMPLES / "model_defects.pt")) and head.stderr == ""


# --------------------------------------------------------------------------- eps 0 (FrozenBatchNorm2d models)


def test_eps_zero_in_eval_mode_is_batchnorm2d_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
    torch.save(x, tmp_path / "x.pt")
    sd = bn_state(3, "bn", seed=4)
    torch.save(sd, tmp_path / "m.pt")
    report = normalize(tmp_path / "x.pt", mode="eval", eps=0.0, checkpoint=tmp_path / "m.pt", layer="bn",
                       output=tmp_path / "y.pt")
    bn = torch.nn.BatchNorm2d(3, eps=0.0).eval()
    bn.load_state_dict({k.removeprefix("bn."): v for k, v in sd.items()})
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), bn(x))
    assert report.eps == 0.0


def test_eps_zero_in_train_mode_is_refused_as_torch_refuses_it(cli):
    with pytest.raises(ValueError, match="eps must be positive during training"):  # torch's own rule
        torch.nn.BatchNorm2d(3, eps=0.0).train()(torch.randn(2, 3, 2, 2))
    result = cli("normalize", SAMPLES / "input.pt", "--eps", "0")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --eps 0 works in eval mode only: torch's batch_norm refuses eps 0 in training")
    assert cli("normalize", SAMPLES / "input.pt", "--eps", "0", "--mode", "eval").exit_code == 0


def test_eps_zero_with_a_zero_running_var_names_the_channels(cli, tmp_path):
    sd = bn_state(3, "bn")
    sd["bn.running_var"][[0, 2]] = 0.0  # pruned channels
    torch.save(torch.randn(4, 3, 5, 5), tmp_path / "x.pt")
    torch.save(sd, tmp_path / "m.pt")
    args = ["normalize", tmp_path / "x.pt", "--mode", "eval", "--eps", "0", "-c", tmp_path / "m.pt", "-l", "bn",
            "-o", tmp_path / "y.pt"]
    result = cli(*args)
    assert result.exit_code == 3, result
    assert result.stderr == (f"error: {tmp_path / 'x.pt'}: with --eps 0, running_var is 0 in channel(s) 0, 2 of the "
                             "layer: normalizing would divide by zero; pass an eps > 0 (PyTorch's default is 1e-5)\n")
    assert not (tmp_path / "y.pt").exists()
    fine = cli(*args[:5], "1e-5", *args[6:])  # with an eps the same layer is fine, as in torch
    assert fine.exit_code == 0, fine



# --------------------------------------------------------------------------- accuracy at the edges


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in float32 ulps (same-sign values)."""
    return int((a.float().view(torch.int32).long() - b.float().view(torch.int32).long()).abs().max())


def _layer_and_data(tmp_path, mean, std, shape=(8, 6, 10, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).float()
    sd = bn_state(shape[1], "bn", seed=seed)
    torch.save(x, tmp_path / "x.pt")
    torch.save(sd, tmp_path / "m.pt")
    return x, {k.removeprefix("bn."): v for k, v in sd.items()}


def _float64_train(x, state, eps=1e-5, momentum=0.1):
    """nn.BatchNorm2d's train-mode formula in float64: the output and the running statistics (exact values)."""
    x64 = x.double()
    dims = [0, 2, 3]
    mean, var_b, var_u = x64.mean(dims), x64.var(dims, correction=0), x64.var(dims, correction=1)
    view = (1, -1, 1, 1)
    y = (x64 - mean.view(view)) / (var_b.view(view) + eps).sqrt() * state["weight"].double().view(view) \
        + state["bias"].double().view(view)
    running_mean = (1 - momentum) * state["running_mean"].double() + momentum * mean
    running_var = (1 - momentum) * state["running_var"].double() + momentum * var_u
    return y, running_mean, running_var


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (2.0, 1.0), (18.0, 1.0), (2000.0, 1.0), (1e4, 1e-2), (1e6, 1.0)])
def test_train_mode_is_at_least_as_close_to_float64_as_batchnorm2d(tmp_path, mean, std):
    x, state = _layer_and_data(tmp_path, mean, std)
    report = normalize(tmp_path / "x.pt", checkpoint=tmp_path / "m.pt", layer="bn", output=tmp_path / "y.pt")
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    y_torch, bn = _reference(x, "train", state=state)
    y64, running_mean, running_var = _float64_train(x, state)
    ours, theirs = (y.double() - y64).abs().max().item(), (y_torch.double() - y64).abs().max().item()
    assert ours <= theirs, (ours, theirs)
    assert ours <= 2.0 ** -24 * y64.abs().max().item() * 1.01  # about half an ulp: the float64 result rounded once
    # The running statistics: the float64 update rounded to float32, within an ulp of the exact value...
    got_mean = torch.tensor([c.running_mean for c in report.channels])
    got_var = torch.tensor([c.running_var for c in report.channels])
    assert _ulps(got_mean, running_mean.float()) <= 1 and _ulps(got_var, running_var.float()) <= 1
    # ...and within 2 ulps of torch's, which rounds the batch mean to float32 before its update and whose own
    # variance loses digits at large offsets
    if abs(mean) <= 18 * std:
        assert _ulps(got_mean, bn.running_mean) <= 2 and _ulps(got_var, bn.running_var) <= 2


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4, 1e5, 1e6])
def test_reported_means_are_float64_accurate_at_any_offset(tmp_path, mode, offset):
    std = 1e-2
    x, _ = _layer_and_data(tmp_path, offset * std, std, seed=5)
    report = normalize(tmp_path / "x.pt", mode=mode, checkpoint=tmp_path / "m.pt", layer="bn", output=tmp_path / "y.pt")
    y = torch.load(tmp_path / "y.pt", weights_only=True).double()
    x64 = x.double()
    for c in report.channels:
        xs, ys = x64[:, c.index], y[:, c.index]
        assert abs(c.input_mean - xs.mean().item()) <= 1e-6 * xs.std().item()
        assert c.input_std == pytest.approx(xs.std().item(), rel=1e-6)
        assert abs(c.output_mean - ys.mean().item()) <= 1e-6 * ys.std().item()
        assert c.output_std == pytest.approx(ys.std().item(), rel=1e-6)


@pytest.mark.parametrize("scale", [1e20, 3e38])
def test_values_near_float32_overflow(tmp_path, scale):
    g = torch.Generator().manual_seed(7)
    if scale == 3e38:  # spread over float32's whole range: float32 sums of these overflow
        x = ((torch.rand((4, 3, 6, 6), generator=g, dtype=torch.float64) * 2 - 1) * scale).float()
    else:  # squares above float32's range
        x = (torch.randn((4, 3, 6, 6), generator=g, dtype=torch.float64) * scale).float()
    assert torch.isfinite(x).all()
    torch.save(x, tmp_path / "x.pt")
    x64 = x.double()
    for mode in ("train", "eval"):
        report = normalize(tmp_path / "x.pt", mode=mode, output=tmp_path / "y.pt")
        y = torch.load(tmp_path / "y.pt", weights_only=True)
        for c in report.channels:
            xs = x64[:, c.index]
            assert abs(c.input_mean - xs.mean().item()) <= 1e-6 * xs.std().item()
            assert c.input_std == pytest.approx(xs.std().item(), rel=1e-6)
        if mode == "train":
            assert torch.isfinite(y).all()
            y64 = _float64_train(x, {"weight": torch.ones(3), "bias": torch.zeros(3), "running_mean": torch.zeros(3),
                                     "running_var": torch.ones(3)})[0]
            y_torch, bn = _reference(x, "train")
            ours = (y.double() - y64).abs().max().item()
            assert ours <= 2.0 ** -24 * y64.abs().max().item() * 1.01
            if torch.isfinite(y_torch).all():
                assert ours <= (y_torch.double() - y64).abs().max().item()
            # running_var = 0.9 + 0.1 var overflows float32 here, for torch as for bncli
            assert [c.running_var for c in report.channels] == bn.running_var.double().tolist()
            for c in report.channels:  # the normalized output's own statistics, not NaN or Inf
                assert c.output_std == pytest.approx(y[:, c.index].double().std().item(), rel=1e-6)
                assert abs(c.output_mean - y[:, c.index].double().mean().item()) <= 1e-6


def _marker(v: float):
    return None if np.isfinite(v) else ("nan" if np.isnan(v) else ("inf" if v > 0 else "-inf"))


def test_json_says_which_non_finite(cli, tmp_path):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x[0, 0, 0, 0] = float("inf")  # channel 0: mean Inf, std NaN (Inf - Inf)
    x[1, 2, 1, 1] = float("-inf")
    torch.save(x, tmp_path / "x.pt")
    result = cli("normalize", tmp_path / "x.pt", "--mode", "eval", "--format", "json")
    assert result.exit_code == 0, result
    channels = json.loads(result.stdout)["channels"]
    for c, entry in enumerate(channels):
        ref = {"input_mean": x[:, c].mean().item(), "input_std": x[:, c].std().item()}  # torch's own, the reference
        expected = {k: _marker(v) for k, v in ref.items() if _marker(v)}
        got = {k: v for k, v in entry.get("non_finite", {}).items() if k in ref}
        assert got == expected, (c, entry)
        assert all(entry[k] is None for k in expected)
    assert channels[0]["non_finite"]["input_mean"] == "inf" and channels[2]["non_finite"]["input_mean"] == "-inf"
    assert "non_finite" not in channels[1]


# --------------------------------------------------------------------------- --kind 1d | 2d | 3d


KIND_SHAPES = [("1d", (16, 5)), ("1d", (6, 5, 7)), ("2d", (4, 5, 3, 6)), ("3d", (3, 5, 2, 3, 4))]
MODULES = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}


def _kind_case(tmp_path, kind, shape, mean=1.5, std=2.0, seed=11):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).float()
    sd = bn_state(shape[1], "bn", seed=seed)
    torch.save(x, tmp_path / "x.pt")
    torch.save(sd, tmp_path / "m.pt")
    module = MODULES[kind](shape[1])
    module.load_state_dict({k.removeprefix("bn."): v for k, v in sd.items()})
    return x, module


@pytest.mark.parametrize(("kind", "shape"), KIND_SHAPES)
def test_kind_eval_is_the_module_bit_for_bit(tmp_path, kind, shape):
    x, module = _kind_case(tmp_path, kind, shape)
    report = normalize(tmp_path / "x.pt", mode="eval", kind=kind, checkpoint=tmp_path / "m.pt", layer="bn",
                       output=tmp_path / "y.pt")
    with torch.no_grad():
        expected = module.eval()(x)
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), expected)
    assert report.kind == kind
    dims = [d for d in range(x.dim()) if d != 1]
    x64 = x.double()
    assert [c.input_mean for c in report.channels] == pytest.approx(x64.mean(dims).tolist(), rel=1e-6, abs=1e-6)
    assert [c.input_std for c in report.channels] == pytest.approx(x64.std(dims).tolist(), rel=1e-6)


@pytest.mark.parametrize(("kind", "shape"), KIND_SHAPES)
@pytest.mark.parametrize("mean", [1.5, 1e4])
def test_kind_train_is_as_close_to_float64_as_the_module(tmp_path, kind, shape, mean):
    x, module = _kind_case(tmp_path, kind, shape, mean=mean, std=2.0 if mean < 100 else 1e-2)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    report = normalize(tmp_path / "x.pt", kind=kind, checkpoint=tmp_path / "m.pt", layer="bn", output=tmp_path / "y.pt")
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        y_torch = module.train()(x)
    x64 = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    view = (1, -1, *[1] * (x.dim() - 2))
    m, vb, vu = x64.mean(dims), x64.var(dims, correction=0), x64.var(dims, correction=1)
    y64 = (x64 - m.view(view)) / (vb.view(view) + 1e-5).sqrt() * state["weight"].double().view(view) \
        + state["bias"].double().view(view)
    assert (y.double() - y64).abs().max() <= (y_torch.double() - y64).abs().max()
    exact_var = 0.9 * state["running_var"].double() + 0.1 * vu
    assert _ulps(torch.tensor([c.running_var for c in report.channels]), exact_var.float()) <= 1
    exact_mean = 0.9 * state["running_mean"].double() + 0.1 * m
    assert _ulps(torch.tensor([c.running_mean for c in report.channels]), exact_mean.float()) <= 1


def test_kind_defaults_to_the_class_a_whole_model_names(cli, tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model[1].running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    torch.save(model, tmp_path / "whole.pt")  # the pickle names torch.nn.modules.batchnorm.BatchNorm1d
    x = torch.randn(10, 3)
    torch.save(x, tmp_path / "x.pt")
    result = cli("normalize", tmp_path / "x.pt", "--mode", "eval", "-c", tmp_path / "whole.pt", "-l", "1",
                 "-o", tmp_path / "y.pt", "--format", "json")
    assert result.exit_code == 0, result
    assert json.loads(result.stdout)["kind"] == "1d"
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), model[1].eval()(x))
    # A state dict does not say: 2d, whose hint names the right --kind.
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    plain = cli("normalize", tmp_path / "x.pt", "--mode", "eval", "-c", tmp_path / "sd.pt", "-l", "1")
    assert plain.exit_code == 3 and "pass --kind 1d" in plain.stderr


@pytest.mark.parametrize(("shape", "hint"), [
    ((8, 3), "expected a 4-D tensor (N, C, H, W) for BatchNorm2d; got shape (8, 3): BatchNorm1d takes (N, C) or "
             "(N, C, L): pass --kind 1d"),
    ((3, 32, 32), "expected a 4-D tensor (N, C, H, W) for BatchNorm2d; got shape (3, 32, 32): BatchNorm1d takes "
                  "(N, C) or (N, C, L): pass --kind 1d; or a single sample (C, H, W)? add a batch dimension with "
                  "--add-batch-dim"),
    ((2, 3, 4, 4, 4), "expected a 4-D tensor (N, C, H, W) for BatchNorm2d; got shape (2, 3, 4, 4, 4): BatchNorm3d "
                      "takes (N, C, D, H, W): pass --kind 3d"),
])
def test_2d_hints_name_the_right_kind(cli, tmp_path, shape, hint):
    torch.save(torch.randn(shape), tmp_path / "x.pt")
    result = cli("normalize", tmp_path / "x.pt")
    assert result.exit_code == 3
    assert result.stderr == f"error: {tmp_path / 'x.pt'}: {hint}\n"
    kind = {2: "1d", 3: "1d", 5: "3d"}[len(shape)]
    fixed = cli("normalize", tmp_path / "x.pt", "--kind", kind)
    assert fixed.exit_code == 0, fixed
    assert f"a fresh BatchNorm{kind}" in fixed.stdout


def test_kind_1d_and_3d_hints_and_layouts(cli, tmp_path):
    torch.save(torch.randn(2, 3, 4, 4), tmp_path / "x4.pt")
    wrong = cli("normalize", tmp_path / "x4.pt", "--kind", "1d")
    assert wrong.exit_code == 3 and "expected a 2-D or 3-D tensor (N, C) or (N, C, L) for BatchNorm1d" in wrong.stderr
    assert "pass --kind 2d" in wrong.stderr
    three = cli("normalize", tmp_path / "x4.pt", "--kind", "3d")
    assert three.exit_code == 3 and "pass --kind 2d" in three.stderr and "single sample (C, D, H, W)" in three.stderr
    # (N, L, C) with --channels-last is (N, C, L), and the output keeps the input's layout
    x = torch.randn(6, 7, 3)
    torch.save(x, tmp_path / "nlc.pt")
    result = cli("normalize", tmp_path / "nlc.pt", "--kind", "1d", "--channels-last", "-o", tmp_path / "y.pt")
    assert result.exit_code == 0, result
    with torch.no_grad():
        expected = nn.BatchNorm1d(3).train()(x.permute(0, 2, 1)).permute(0, 2, 1)
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    assert y.shape == x.shape and torch.allclose(y, expected, atol=1e-6)
    one = cli("normalize", tmp_path / "nlc.pt", "--kind", "3d", "--add-batch-dim", "--mode", "eval")
    assert one.exit_code == 3 and "--add-batch-dim expects a 4-D tensor (C, D, H, W)" in one.stderr
    single = torch.randn(1, 3)
    torch.save(single, tmp_path / "one.pt")
    refused = cli("normalize", tmp_path / "one.pt", "--kind", "1d")
    assert refused.exit_code == 3 and "gives N = 1" in refused.stderr
