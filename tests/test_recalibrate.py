"""`recalibrate`: exact population statistics, checked against closed forms and hook-collected references."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from collections import OrderedDict

import models_for_tests
import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLES

from bncli.recalibrate import batchnorm_modules, population_moments


def drifting_data(n=50, seed=0, shape=(3, 5, 5)):
    """Samples whose per-channel offset drifts with the index, so batch means differ from batch to batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    drift = torch.linspace(-2.0, 3.0, n, dtype=torch.float64).view(n, 1, 1, 1)
    x = x * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1) + drift + 1.5
    return x.float()


def closed_form(x):
    """Mean and unbiased variance of the 1x1 convolution's output, written out in float64."""
    w = torch.tensor(models_for_tests.POINTWISE_WEIGHT, dtype=torch.float64)
    b = torch.tensor(models_for_tests.POINTWISE_BIAS, dtype=torch.float64)
    y = torch.einsum("oc,nchw->onhw", w, x.double()).reshape(4, -1) + b[:, None]
    return y.mean(dim=1), y.var(dim=1, correction=1)


@pytest.mark.parametrize("batch_size", [50, 16, 7, 3])  # 16, 7 and 3 leave an uneven last batch
def test_pointwise_matches_closed_form_where_update_bn_does_not(batch_size):
    x = drifting_data()
    mean, var = closed_form(x)
    model = models_for_tests.pointwise()
    moments, count = population_moments(model, torch.split(x, batch_size))
    got = moments["1"]
    assert count == -(-50 // batch_size)
    assert got.count == 50 * 25
    std = var.sqrt()
    assert torch.all((got.mean - mean).abs() <= 1e-6 * std)
    assert torch.allclose(got.var, var, rtol=1e-6, atol=0)

    swa_model = models_for_tests.pointwise()
    torch.optim.swa_utils.update_bn(list(torch.split(x, batch_size)), swa_model)
    bn = swa_model[1]
    ours = ((got.var - var).abs() / var).max().item()
    theirs = ((bn.running_var.double() - var).abs() / var).max().item()
    if batch_size == 50:  # one batch: the batch variance is the population variance, update_bn is right too
        assert theirs < 1e-5
    else:
        assert theirs > 1e-3 > 1e-6 > ours


def reference_moments(model, batches):
    """Collect every BatchNorm layer's inputs with forward hooks (BN in train mode, the rest in eval)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in batchnorm_modules(model):
        seen[name] = []
        handles.append(m.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(args[0].detach().double())))
    model.eval()
    for _, m in batchnorm_modules(model):
        m.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in handles:
        h.remove()
    result = {}
    for name, inputs in seen.items():
        flat = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in inputs], dim=1)
        result[name] = (flat.mean(dim=1), flat.var(dim=1, correction=1), flat.shape[1])
    return result


def test_deep_model_matches_hooked_reference_and_is_bit_identical():
    x = drifting_data(n=37, seed=3, shape=(3, 8, 8))
    batches = list(torch.split(x, 10))  # 10, 10, 10, 7
    ref = reference_moments(models_for_tests.deep(), batches)
    first, count = population_moments(models_for_tests.deep(), batches)
    second, _ = population_moments(models_for_tests.deep(), batches)
    assert count == 4
    assert list(first) == ["body.1", "body.5", "body.9", "head.1"]
    for name, (mean, var, n) in ref.items():
        got = first[name]
        assert got.count == n
        # Each batch's statistics are rounded once to float32 (BatchNorm's own, accumulated in float64 on the CPU),
        # then merged in float64: within 1e-6 of the float64 reference, the accuracy bncli promises.
        assert torch.all((got.mean - mean).abs() <= 1e-6 * var.sqrt())
        assert torch.allclose(got.var, var, rtol=1e-6, atol=0)
        assert torch.equal(got.mean, second[name].mean) and torch.equal(got.m2, second[name].m2)


def test_modules_are_restored_and_dropout_was_off():
    model = models_for_tests.deep()
    model.train()
    x = drifting_data(n=8, shape=(3, 8, 8))
    a, _ = population_moments(model, [x])
    b, _ = population_moments(model, [x])  # with dropout on, the second run would see other inputs
    assert all(m.training for m in model.modules())
    assert torch.equal(a["head.1"].m2, b["head.1"].m2)


# --------------------------------------------------------------------------- the command, end to end


def save_wrapped(path, model, prefix="module.", seed=0):
    """A trained-looking checkpoint: {'state_dict': {prefix + key: ...}, 'epoch': 7}, with arbitrary BN statistics."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for k, v in model.state_dict().items():
        if k.endswith("running_mean"):
            v = torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("num_batches_tracked"):
            v = torch.tensor(100)
        sd[prefix + k] = v.clone()
    torch.save({"state_dict": sd, "epoch": 7}, path)
    return sd


def test_cli_writes_exact_statistics_keeping_the_wrapping(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.pt"
    before = save_wrapped(ckpt, models_for_tests.deep())
    x = drifting_data(n=45, seed=5, shape=(3, 8, 8))
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "a.npy", x[:20].numpy())
    torch.save(x[20:], folder / "b.pt")
    out = tmp_path / "out.pt"
    result = cli("recalibrate", ckpt, "--model", "models_for_tests:deep", "--data", folder, "--batch-size", "8",
                 "--num-samples", "43", "--output", out)
    assert result.exit_code == 0, result
    assert "on 43 of 45 samples in 6 batches of up to 8 (cpu)" in result.stdout
    assert "body.1" in result.stdout and "changed" in result.stdout

    ref = reference_moments(models_for_tests.deep(), list(torch.split(x[:43], 8)))
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"state_dict", "epoch"} and saved["epoch"] == 7
    sd = saved["state_dict"]
    assert list(sd) == list(before)
    for name, (mean, var, _) in ref.items():
        k = f"module.{name}."
        assert sd[k + "running_mean"].dtype == torch.float32
        assert torch.allclose(sd[k + "running_mean"].double(), mean, rtol=1e-6, atol=1e-6)
        assert torch.allclose(sd[k + "running_var"].double(), var, rtol=1e-6, atol=0)
        assert sd[k + "num_batches_tracked"].item() == 106
    for k, v in before.items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(sd[k], v), k


def test_cli_safetensors_stays_safetensors(cli, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = models_for_tests.pointwise()
    ckpt = tmp_path / "m.safetensors"
    save_file(model.state_dict(), ckpt, metadata={"note": "kept"})
    x = drifting_data(n=20)
    torch.save(x, tmp_path / "x.pt")
    out = tmp_path / "out.safetensors"
    result = cli("recalibrate", ckpt, "-m", "models_for_tests:pointwise", "-d", tmp_path / "x.pt", "-b", "6", "-o", out,
                 "--format", "json")
    assert result.exit_code == 0, result
    payload = json.loads(result.stdout)
    assert payload["batches"] == 4 and payload["samples"] == 20
    assert payload["diff"]["layers"][0]["verdict"] == "changed"
    mean, var = closed_form(x)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"note": "kept"}
        assert torch.allclose(f.get_tensor("1.running_var").double(), var, rtol=1e-6)
        assert torch.allclose(f.get_tensor("1.running_mean").double(), mean, rtol=1e-6, atol=1e-6)
        assert f.get_tensor("1.num_batches_tracked").item() == 4


def test_cli_strict_mismatch_lists_keys(cli, tmp_path):
    sd = models_for_tests.pointwise().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["0.bias"]
    ckpt = tmp_path / "m.pt"
    torch.save(sd, ckpt)
    torch.save(drifting_data(n=4), tmp_path / "x.pt")
    result = cli("recalibrate", ckpt, "-m", "models_for_tests:pointwise", "-d", tmp_path / "x.pt", "-o", tmp_path / "o.pt")
    assert result.exit_code == 3
    assert result.stderr.strip() == (
        f"error: {ckpt}: does not fit --model models_for_tests:pointwise: missing keys: 0.bias; unexpected keys: extra.weight"
    )
    assert not (tmp_path / "o.pt").exists()


def test_cli_model_from_current_directory_with_kwargs(cli, tmp_path, monkeypatch):
    (tmp_path / "localpkg.py").write_text(
        "import torch.nn as nn\n\ndef make(width):\n    return nn.Sequential(nn.Conv2d(3, width, 1), nn.BatchNorm2d(width))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    torch.manual_seed(0)
    import torch.nn as nn

    torch.save(nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5)).state_dict(), tmp_path / "m.pt")
    torch.save(drifting_data(n=6), tmp_path / "x.pt")
    args = ["recalibrate", "m.pt", "-m", "localpkg:make", "-d", "x.pt", "-o", "o.pt"]
    assert cli(*args, "--model-kwargs", '{"width": 5}').exit_code == 0
    bad = cli(*args, "--model-kwargs", "[5]")
    assert bad.exit_code == 2 and "expected a JSON object" in bad.stderr
    wrong = cli(*args, "--model-kwargs", '{"width": 4}')
    assert wrong.exit_code == 3 and "size mismatch for 0.weight" in wrong.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-m", "nomod_xyz:f"], 3, "error: --model nomod_xyz:f: cannot import 'nomod_xyz' (No module named 'nomod_xyz')"),
        (["-m", "models_for_tests:no"], 3, "error: --model models_for_tests:no: 'models_for_tests' has no attribute 'no'"),
        (["-m", "models_for_tests"], 2, "expected MODULE:FACTORY"),
        (["-m", "models_for_tests:POINTWISE_BIAS"], 3, "models_for_tests:POINTWISE_BIAS: 'POINTWISE_BIAS' is not callable"),
    ],
)
def test_cli_model_errors(cli, tmp_path, args, code, message):
    torch.save(models_for_tests.pointwise().state_dict(), tmp_path / "m.pt")
    torch.save(drifting_data(n=4), tmp_path / "x.pt")
    result = cli("recalibrate", tmp_path / "m.pt", *args, "-d", tmp_path / "x.pt", "-o", tmp_path / "o.pt")
    assert result.exit_code == code, result
    assert message in result.stderr


def test_cli_data_errors(cli, tmp_path):
    torch.save(models_for_tests.pointwise().state_dict(), tmp_path / "m.pt")
    torch.save(torch.zeros(4, 3, 5, 5, dtype=torch.uint8), tmp_path / "u8.pt")
    np.save(tmp_path / "a.npy", np.zeros((4, 3, 5, 5), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((4, 3, 6, 6), np.float32))
    base = ["recalibrate", tmp_path / "m.pt", "-m", "models_for_tests:pointwise", "-o", tmp_path / "o.pt"]
    r = cli(*base, "-d", tmp_path / "u8.pt")
    assert r.exit_code == 3 and f"error: {tmp_path / 'u8.pt'}: data has dtype uint8" in r.stderr
    r = cli(*base, "-d", tmp_path / "a.npy", "-d", tmp_path / "b.npy")
    assert r.exit_code == 3
    assert f"error: {tmp_path / 'b.npy'}: samples have shape (3, 6, 6), but {tmp_path / 'a.npy'} has (3, 5, 5)" in r.stderr
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 5, 5), np.float32))
    r = cli(*base, "-d", tmp_path / "empty.npy")
    assert r.exit_code == 3 and r.stderr.strip() == f"error: {tmp_path / 'empty.npy'}: no samples to calibrate on (N = 0)"
    r = cli("recalibrate", tmp_path / "m.pt", "-m", "models_for_tests:pointwise", "-d", tmp_path / "a.npy",
            "-o", tmp_path / "nodir" / "o.pt")
    assert r.exit_code == 3
    assert r.stderr.strip() == f"error: {tmp_path / 'nodir' / 'o.pt'}: cannot write: folder {tmp_path / 'nodir'} does not exist"
    r = cli(*base, "-d", tmp_path / "missing.npy")
    assert r.exit_code == 3 and f"error: {tmp_path / 'missing.npy'}: no such file" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_cli_cuda_unavailable(cli, tmp_path):
    torch.save(models_for_tests.pointwise().state_dict(), tmp_path / "m.pt")
    torch.save(drifting_data(n=4), tmp_path / "x.pt")
    r = cli("recalibrate", tmp_path / "m.pt", "-m", "models_for_tests:pointwise", "-d", tmp_path / "x.pt",
            "-o", tmp_path / "o.pt", "--device", "cuda")
    assert r.exit_code == 3
    message = "error: --device cuda: CUDA is not available (no GPU visible, or this torch was built without CUDA)"
    assert r.stderr.strip() == message


def test_sample_data_recalibrates(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "model.recal.pt"
    result = cli("recalibrate", SAMPLES / "model.pt", "--model", "sample_data.smallcnn:small_cnn",
                 "--data", SAMPLES / "input.pt", "--data", SAMPLES / "input.npy", "--batch-size", "5", "--output", out)
    assert result.exit_code == 0, result
    assert "on 16 samples in 4 batches of up to 5" in result.stdout
    saved = torch.load(out, weights_only=True)
    assert saved["arch"] == "SmallCNN" and saved["state_dict"]["module.features.1.num_batches_tracked"].item() == 260

    # The same 8 images from a safetensors file that also holds labels: --key picks the images.
    again = cli("recalibrate", SAMPLES / "model.pt", "-m", "sample_data.smallcnn:small_cnn", "-d", SAMPLES / "inputs.safetensors",
                "--key", "images", "-d", SAMPLES / "input.npy", "-b", "5", "-o", tmp_path / "again.pt")
    assert again.exit_code == 0, again
    resaved = torch.load(tmp_path / "again.pt", weights_only=True)["state_dict"]
    for k, v in saved["state_dict"].items():
        assert torch.equal(resaved[k], v), k
    no_key = cli("recalibrate", SAMPLES / "model.pt", "-m", "sample_data.smallcnn:small_cnn",
                 "-d", SAMPLES / "inputs.safetensors", "-o", tmp_path / "x.pt")
    assert no_key.exit_code == 3
    assert "holds 2 tensors; choose one with --key: labels, images" in no_key.stderr  # file order, as normalize says
    assert "images" in no_key.stderr and "labels" in no_key.stderr


# --------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(tmp_path):
    ckpt = tmp_path / "model.pt"
    save_wrapped(ckpt, models_for_tests.deep())
    np.save(tmp_path / "x.npy", drifting_data(n=53, seed=9, shape=(3, 8, 8)).numpy())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "NO_COLOR": "1",
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = ["-m", "bncli", "recalibrate", str(ckpt), "--model", "models_for_tests:deep", "--data", str(tmp_path / "x.npy"),
            "--batch-size", "8", "--format", "json"]
    single = subprocess.run([sys.executable, *args, "-o", str(tmp_path / "one.pt")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    multi = subprocess.run([*launcher, *args, "-o", str(tmp_path / "two.pt")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert multi.returncode == 0, multi.stderr
    report = json.loads(multi.stdout)  # only rank 0 prints
    assert report["world_size"] == 2 and report["batches"] == 7 and report["samples"] == 53
    one = torch.load(tmp_path / "one.pt", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "two.pt", weights_only=True)["state_dict"]
    for k in one:
        if k.endswith(("running_mean", "running_var")):
            assert torch.allclose(two[k].double(), one[k].double(), rtol=1e-6, atol=1e-7), k
        else:
            assert torch.equal(two[k], one[k]), k
    assert copy.copy(two["module.body.1.num_batches_tracked"]).item() == 107


def _two_ranks(tmp_path, args, env):
    """Start two gloo ranks of `python -m bncli ARGS` by hand (torchrun would hide each rank's exit code)."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        rank_env = {**env, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "bncli", *args], cwd=ROOT, env=rank_env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return [(p.wait(timeout=120), *p.communicate()) for p in procs]


@pytest.mark.parametrize("case", ["rank 1 fails", "rank 0 fails", "rank 0 cannot write"])
def test_one_failing_rank_fails_every_rank_with_its_code(tmp_path, case):
    ckpt = tmp_path / "model.pt"
    save_wrapped(ckpt, models_for_tests.deep())
    # Batches of 8: with 41 samples the sixth batch (rank 1's) has one sample, with 49 the seventh (rank 0's) has;
    # the BatchNorm1d head cannot take a batch of one in train mode.
    n = {"rank 1 fails": 41, "rank 0 fails": 49, "rank 0 cannot write": 48}[case]
    np.save(tmp_path / "x.npy", drifting_data(n=n, seed=9, shape=(3, 8, 8)).numpy())
    out = tmp_path / ("missing" if case == "rank 0 cannot write" else "") / "out.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "NO_COLOR": "1",
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    (rc0, out0, err0), (rc1, out1, err1) = _two_ranks(
        tmp_path, ["recalibrate", str(ckpt), "--model", "models_for_tests:deep", "--data", str(tmp_path / "x.npy"),
                   "--batch-size", "8", "-o", str(out)], env)
    assert (rc0, rc1) == (3, 3), (err0, err1)
    assert out0 == out1 == "" and err1 == ""  # rank 0 says it, once; nothing on stdout
    assert err0.count("\n") == 1 and err0.startswith("error: "), err0
    if case == "rank 1 fails":
        assert err0 == ("error: rank 1 of 2: a batch of shape (1, 3, 8, 8) gives a BatchNorm layer only one value per "
                        "channel, and a batch of one value has no variance; choose --batch-size or --num-samples so "
                        "that no batch is that small\n")
    elif case == "rank 0 fails":
        assert err0.startswith("error: a batch of shape (1, 3, 8, 8) gives a BatchNorm layer only one value"), err0
    else:
        assert "cannot write: folder" in err0 and "does not exist" in err0, err0
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "x.npy"]


def test_checkpoint_without_num_batches_tracked_loads(cli, tmp_path):
    sd = models_for_tests.pointwise().state_dict()
    del sd["1.num_batches_tracked"]  # as saved by torch < 0.4.1; torch's loader accepts it
    torch.save(sd, tmp_path / "old.pt")
    torch.save(drifting_data(n=10), tmp_path / "x.pt")
    result = cli("recalibrate", tmp_path / "old.pt", "-m", "models_for_tests:pointwise", "-d", tmp_path / "x.pt",
                 "-o", tmp_path / "o.pt")
    assert result.exit_code == 0, result
    saved = torch.load(tmp_path / "o.pt", weights_only=True)
    assert "1.num_batches_tracked" not in saved
    assert torch.allclose(saved["1.running_var"].double(), closed_form(drifting_data(n=10))[1], rtol=1e-6)


def test_sync_batchnorm_is_normalized_locally():
    x = drifting_data(n=12)
    plain = models_for_tests.pointwise()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(models_for_tests.pointwise())
    assert isinstance(synced[1], torch.nn.SyncBatchNorm)
    a, _ = population_moments(plain, torch.split(x, 5))
    b, _ = population_moments(synced, torch.split(x, 5))
    assert torch.equal(a["1"].mean, b["1"].mean) and torch.equal(a["1"].m2, b["1"].m2)
    assert "forward" not in vars(synced[1])  # the class's forward is back


# --------------------------------------------------------------------------- in place, Lightning prefixes, loads


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_in_place_reports_the_real_drift(cli, tmp_path, suffix):
    from safetensors.torch import save_file

    model = models_for_tests.pointwise()
    sd = OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    ckpt = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(sd, ckpt)
    else:
        save_file(sd, ckpt)
    x = drifting_data(n=20)
    torch.save(x, tmp_path / "x.pt")
    result = cli("recalibrate", ckpt, "-m", "models_for_tests:pointwise", "-d", tmp_path / "x.pt", "-b", "6", "-o", ckpt,
                 "--format", "json")
    assert result.exit_code == 0, result
    layer = json.loads(result.stdout)["diff"]["layers"][0]
    mean, var = closed_form(x)
    assert layer["verdict"] == "changed" and layer["batches_b"] - layer["batches_a"] == 4
    # The drift is between the statistics before (fresh layer: mean 0, var 1) and the ones written.
    va = sd["1.running_var"].double()
    assert layer["var_ratio_max"] == pytest.approx((var / va).max().item(), rel=1e-5)
    assert layer["max_shift"] == pytest.approx(((mean - sd["1.running_mean"].double()).abs() / (va + 1e-5).sqrt()).max().item(),
                                               rel=1e-5)
    again = cli("diff", ckpt, ckpt, "--fail-if-unchanged")  # and the file does hold the new statistics
    assert again.exit_code == 1


def test_lightning_checkpoint_keeps_its_prefix_and_wrapping(cli, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    before = save_wrapped(ckpt, models_for_tests.pointwise(), prefix="model.")
    x = drifting_data(n=20)
    torch.save(x, tmp_path / "x.pt")
    out = tmp_path / "out.ckpt"
    base = ["recalibrate", ckpt, "-m", "models_for_tests:pointwise", "-d", tmp_path / "x.pt", "-b", "6", "-o", out]
    refused = cli(*base)
    assert refused.exit_code == 3 and "missing keys: 0.weight" in refused.stderr
    result = cli(*base, "--strip-prefix", "model")
    assert result.exit_code == 0, result
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"state_dict", "epoch"} and saved["epoch"] == 7
    assert list(saved["state_dict"]) == list(before)
    mean, var = closed_form(x)
    assert torch.allclose(saved["state_dict"]["model.1.running_var"].double(), var, rtol=1e-6)
    assert torch.allclose(saved["state_dict"]["model.1.running_mean"].double(), mean, rtol=1e-6, atol=1e-6)


def test_each_data_file_is_loaded_once(tmp_path, monkeypatch):
    from bncli import calib_data, loading

    x = drifting_data(n=40)
    torch.save(x[:25], tmp_path / "a.pt")
    torch.save({"images": x[25:], "labels": torch.zeros(15)}, tmp_path / "b.pt")
    loads = []
    real = loading.torch_load_checked

    def counting(path, fmt, mmap=False):
        loads.append(path.name)
        return real(path, fmt, mmap)

    monkeypatch.setattr(loading, "torch_load_checked", counting)
    sources = calib_data.discover([tmp_path / "a.pt", tmp_path / "b.pt"], key="images")
    loads.clear()  # discover opens each file once to read its shape
    batches = calib_data.plan(sources, 3, None)
    got = torch.cat(list(calib_data.iterate(sources, batches)))
    assert len(batches) == 14
    assert sorted(loads) == ["a.pt", "b.pt"]
    assert torch.equal(got, x)


def test_rows_read_from_files_equal_the_data(tmp_path):
    from safetensors.torch import save_file

    from bncli import calib_data

    x = drifting_data(n=11)
    np.save(tmp_path / "a.npy", x[:4].numpy())
    np.save(tmp_path / "b.npy", x[4:6].numpy().astype(">f4"))  # big-endian
    np.save(tmp_path / "c.npy", np.asfortranarray(x[6:8].numpy()))
    save_file({"images": x[8:].bfloat16(), "labels": torch.zeros(3)}, tmp_path / "d.safetensors")
    sources = calib_data.discover([tmp_path / n for n in ("a.npy", "b.npy", "c.npy", "d.safetensors")], key="images")
    got = list(calib_data.iterate(sources, calib_data.plan(sources, 3, None)))
    assert [tuple(t.shape) for t in got] == [(3, 3, 5, 5)] * 3 + [(2, 3, 5, 5)]
    whole = torch.cat(got)
    assert whole[:8].dtype == torch.float32 and torch.equal(whole[:8], x[:8])
    assert torch.equal(whole[8:], x[8:].bfloat16().float())


def test_json_says_which_non_finite(cli, tmp_path):
    """The defects sample has a NaN variance (features.5, channel 3) and a negative one (features.9, channel 4)."""
    result = cli("recalibrate", SAMPLES / "model_defects.safetensors", "-m", "sample_data.smallcnn:small_cnn",
                 "-d", SAMPLES / "input.pt", "-b", "4", "-o", tmp_path / "r.safetensors", "--format", "json")
    assert result.exit_code == 0, result
    layers = {x["name"]: x for x in json.loads(result.stdout)["diff"]["layers"]}
    assert layers["features.5"]["max_shift"] is None
    assert layers["features.5"]["non_finite"] == {"max_shift": "nan", "var_ratio_min": "nan", "var_ratio_max": "nan",
                                                  "mean_kl": "nan"}
    assert layers["features.9"]["non_finite"]["var_ratio_min"] == "nan"  # a negative variance has no ratio
    assert "non_finite" not in layers["features.1"]


# --------------------------------------------------------------------------- the fused path (BatchNorm's own statistics)


def offset_data(offset, n=45, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, 6, 6), generator=g) * torch.tensor([1.0, 0.01, 3.0]).view(1, 3, 1, 1) + offset


@pytest.mark.parametrize("offset", [0.0, 1e4, -3e5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_statistics_within_1e6_of_float64_even_far_from_zero(offset, channels_last, monkeypatch):
    """torch's BatchNorm measures each batch (float64 accumulation on the CPU); bncli reads that, merges in float64,
    and corrects the float32-rounded mean where it is far from 0 in stds. No float64 copy of the input is made:
    the exact pre-hook (batch_moments) is not called for torch's own BatchNorm classes."""
    import bncli.recalibrate as core

    monkeypatch.setattr(core, "batch_moments", lambda x: pytest.fail("the fused path copies no input to float64"))
    x = offset_data(offset)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(3)
    moments, count = population_moments(torch.nn.Sequential(bn), torch.split(x, 8))  # 8 x 5, then 5
    assert count == 6
    flat = x.double().transpose(0, 1).reshape(3, -1)
    mean, var = flat.mean(dim=1), flat.var(dim=1, correction=1)
    got = moments["0"]
    assert got.count == 45 * 36
    assert torch.all((got.mean - mean).abs() <= 1e-6 * var.sqrt()), (got.mean - mean) / var.sqrt()
    assert torch.allclose(got.var, var, rtol=1e-6, atol=0)
    assert bn.momentum == 0.1  # restored


def test_fused_path_ignores_nan_buffers_and_restores_momentum_none():
    x = offset_data(2.0)
    bn = torch.nn.BatchNorm2d(3, momentum=None)
    bn.running_var.fill_(float("nan"))
    bn.running_mean.fill_(float("inf"))
    moments, _ = population_moments(torch.nn.Sequential(bn), torch.split(x, 10))
    flat = x.double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(moments["0"].var, flat.var(dim=1), rtol=1e-6)
    assert bn.momentum is None


class OwnForward(torch.nn.BatchNorm2d):
    """A subclass with a forward of its own (frozen statistics, say): its buffers say nothing of the batch."""

    def forward(self, x):
        return torch.nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def test_a_batchnorm_with_its_own_forward_is_measured_from_its_input():
    x = offset_data(1e3)
    moments, _ = population_moments(torch.nn.Sequential(OwnForward(3)), torch.split(x, 8))
    flat = x.double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(moments["0"].mean, flat.mean(dim=1), rtol=1e-12, atol=0)  # float64 throughout
    assert torch.allclose(moments["0"].var, flat.var(dim=1), rtol=1e-9, atol=0)
