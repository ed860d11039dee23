"""Whole pickled models (torch.save(model), ultralytics-style containers) read as data: names, eps, momentum, class
and statistics equal named_modules() of the original model, and nothing from the file is ever imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bncli.loading import load_checkpoint

PACKAGE = "fakeyolo_models"

MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class FrozenBatchNorm2d(nn.Module):
        # torchvision's: buffers only, eps 0 after overwrite_eps(model, 0.0)
        def __init__(self, n, eps=0.0):
            super().__init__()
            self.eps = eps
            self.register_buffer("weight", torch.ones(n))
            self.register_buffer("bias", torch.zeros(n))
            self.register_buffer("running_mean", torch.zeros(n))
            self.register_buffer("running_var", torch.ones(n))


    class Conv(nn.Module):
        def __init__(self, c1, c2):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)  # ultralytics' values
            self.act = nn.SiLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))


    class DetectionModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(Conv(3, 8), Conv(8, 16), nn.ModuleList([Conv(16, 16), Conv(16, 16)]))
            self.shared = self.model[0]  # the same module twice: named_modules() names it once
            self.head = nn.BatchNorm1d(16, momentum=None, affine=False)
            self.vol = nn.BatchNorm3d(4, track_running_stats=True)
            self.sync = nn.SyncBatchNorm(5)
            self.frozen = FrozenBatchNorm2d(6)
            self.names = ["person", "car"]  # plain attributes ultralytics keeps
            self.stride = torch.tensor([8.0, 16.0])

        def forward(self, x):
            y = self.model[1](self.model[0](x))
            for block in self.model[2]:
                y = block(y)
            return self.head(y.mean((2, 3)))
    """
)

BUILD = textwrap.dedent(
    """
    import argparse, json, sys
    import torch
    from {package}.models import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel()
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8) * 2 + 1)
    with torch.no_grad():
        model.model[1].bn.running_var[0] = 1e-4  # below its own eps (1e-3), above the default 1e-5
        model.vol(torch.randn(2, 4, 2, 3, 3))
        model.sync.running_mean.uniform_(-1, 1)
        model.frozen.running_var.uniform_(0.5, 2)
        model.frozen.running_var[1] = 1e-6  # below the default 1e-5, not below its own eps 0
    half = sys.argv[2] == "half"
    if half:
        model = model.half()
    reference = {{}}
    for name, module in model.named_modules():
        if hasattr(module, "running_mean") and hasattr(module, "running_var"):
            reference[name] = {{
                "class": type(module).__module__ + "." + type(module).__qualname__,
                "eps": module.eps,
                "momentum": getattr(module, "momentum", "absent"),
                "dtype": str(module.running_var.dtype).removeprefix("torch."),
                "running_var": module.running_var.double().tolist(),
            }}
    state_keys = list(model.state_dict())
    out = sys.argv[1]
    legacy = sys.argv[3] == "legacy"
    shapes = {{
        "bare": model,
        "yolov5": {{"epoch": 3, "model": model, "ema": model, "updates": 9, "optimizer": None,
                    "train_args": argparse.Namespace(lr0=0.01)}},
        "ultralytics-training": {{"model": None, "ema": model, "train_args": {{"lr0": 0.01}}}},
        "ultralytics-stripped": {{"model": model, "ema": None, "date": "2026-01-01"}},
        "beside-state-dict": {{"model": model, "state_dict_ema": model.state_dict()}},
    }}
    for shape, obj in shapes.items():
        torch.save(obj, f"{{out}}/{{shape}}.pt", _use_new_zipfile_serialization=not legacy)
    torch.save(model.state_dict(), f"{{out}}/state_dict.pt")
    json.dump({{"layers": reference, "state_keys": state_keys}}, open(f"{{out}}/reference.json", "w"))
    """
)


def _build(tmp_path: Path, precision: str, form: str) -> tuple[Path, dict]:
    """Files saved by a throwaway package in a child process; the package is deleted before anything reads them."""
    src = tmp_path / "src"
    (src / PACKAGE).mkdir(parents=True)
    (src / PACKAGE / "__init__.py").write_text("")
    (src / PACKAGE / "models.py").write_text(MODEL_SOURCE)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-c", BUILD.format(package=PACKAGE), str(out), precision, form], env=env, check=True,
                   timeout=120)
    shutil.rmtree(src)
    return out, json.loads((out / "reference.json").read_text())


@pytest.fixture(scope="module", params=[("float", "zip"), ("half", "zip"), ("float", "legacy")], ids=lambda p: "-".join(p))
def saved(request, tmp_path_factory):
    return _build(tmp_path_factory.mktemp("models"), *request.param)


def test_layers_equal_named_modules(saved):
    out, ref = saved
    ckpt = load_checkpoint(out / "bare.pt")
    assert list(ckpt) == ref["state_keys"]  # the state dict torch's state_dict() gives, in its order
    assert ckpt.provenance.model_class == f"{PACKAGE}.models.DetectionModel"
    # named_modules() names a shared module once; state_dict() (and so bncli, to match a saved state dict) under
    # each of its names
    assert sorted(ckpt.layer_meta) == sorted({*ref["layers"], "shared.bn"})
    assert ckpt.layer_meta["shared.bn"] == ckpt.layer_meta["model.0.bn"]
    for name, expected in ref["layers"].items():
        meta = ckpt.layer_meta[name]
        assert meta.class_path == expected["class"], name
        assert meta.eps == expected["eps"], name
        if expected["momentum"] == "absent":
            assert not meta.momentum_given, name
        else:
            assert meta.momentum == expected["momentum"], name
        assert ckpt.dtype(f"{name}.running_var") == expected["dtype"], name
        np.testing.assert_array_equal(ckpt.read(f"{name}.running_var"), np.asarray(expected["running_var"], np.float32))


def test_containers_choose_the_model_as_for_state_dicts(saved):
    out, _ = saved
    cases = {
        "yolov5": ("model", ("ema",)),
        "ultralytics-training": ("ema", ()),
        "ultralytics-stripped": ("model", ()),
        "beside-state-dict": ("model", ("state_dict_ema",)),
    }
    for shape, (container, alternatives) in cases.items():
        prov = load_checkpoint(out / f"{shape}.pt").provenance
        assert (prov.container, prov.alternatives) == (container, alternatives), shape
    assert load_checkpoint(out / "yolov5.pt", state="ema").provenance.container == "ema"
    assert "argparse.Namespace" in load_checkpoint(out / "yolov5.pt").provenance.pickled_globals


def _run_cli(args, env_extra, cwd):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "bncli", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def test_a_booby_trapped_package_is_never_imported(saved, tmp_path):
    """A package of the same name on PYTHONPATH (and torch's env var forcing weights_only=False): never imported."""
    out, ref = saved
    trap = tmp_path / "trap"
    (trap / PACKAGE).mkdir(parents=True)
    marker = tmp_path / "IMPORTED"
    code = f"open({str(marker)!r}, 'w').write('imported')\n"
    (trap / PACKAGE / "__init__.py").write_text(code)
    (trap / PACKAGE / "models.py").write_text(code)
    repo = Path(__file__).resolve().parent.parent
    env = {"PYTHONPATH": f"{repo}{os.pathsep}{trap}", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    for shape in ("bare", "yolov5", "ultralytics-training"):
        done = _run_cli(["inspect", str(out / f"{shape}.pt"), "--format", "json"], env, tmp_path)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)["files"][0]
        by_name = {layer["name"]: layer for layer in report["layers"]}
        for name, expected in ref["layers"].items():
            shown = name or "<root>"
            assert by_name[shown]["eps"] == expected["eps"]
            assert by_name[shown]["class"] == expected["class"]
        assert [f["rule"] for f in report["findings"] if f["rule"] == "BN012"] == ["BN012"]
    assert not marker.exists()


def test_rules_use_each_layers_own_eps(saved):
    """BN004 with each layer's eps: 1e-4 is collapsed for an eps-1e-3 layer, 1e-6 is not for an eps-0 one."""
    from bncli.audit import inspect_file
    from bncli.rules import Thresholds

    out, _ = saved
    report = inspect_file(out / "bare.pt", thresholds=Thresholds(eps=1e-5))
    bn004 = {f.layer: f for f in report.findings if f.rule == "BN004"}
    assert set(bn004) == {"model.1.bn"} and bn004["model.1.bn"].channels == (0,)
    assert "running_var below 0.001 in channel(s) 0" in bn004["model.1.bn"].message
    # the same values in a state dict, which does not say eps: --eps decides, and the frozen layer is collapsed
    plain = inspect_file(out / "state_dict.pt", thresholds=Thresholds(eps=1e-5))
    assert {f.layer for f in plain.findings if f.rule == "BN004"} == {"frozen"}


def test_diff_whole_model_against_its_state_dict(saved, tmp_path):
    out, _ = saved
    repo = Path(__file__).resolve().parent.parent
    done = _run_cli(["diff", str(out / "bare.pt"), str(out / "state_dict.pt"), "--format", "json"], {"PYTHONPATH": str(repo)},
                    tmp_path)
    assert done.returncode == 0, done.stderr
    layers = json.loads(done.stdout)["layers"]
    assert layers and all(layer["verdict"] == "identical" for layer in layers)


def test_normalize_uses_the_layers_own_eps_and_momentum(saved, tmp_path):
    out, ref = saved
    if ref["layers"]["model.1.bn"]["dtype"] != "float32":
        pytest.skip("one precision is enough")
    torch.manual_seed(1)
    x = torch.randn(4, 16, 5, 5) * 3 + 2
    torch.save(x, tmp_path / "x.pt")
    repo = Path(__file__).resolve().parent.parent
    state = load_checkpoint(out / "bare.pt")
    bn = torch.nn.BatchNorm2d(16, eps=1e-3, momentum=0.03)  # the layer as the model built it
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, key).copy_(torch.from_numpy(state.read(f"model.1.bn.{key}")))
    for mode in ("eval", "train"):
        y_path = tmp_path / f"y_{mode}.pt"
        done = _run_cli(["normalize", str(tmp_path / "x.pt"), "-c", str(out / "bare.pt"), "-l", "model.1.bn", "--mode", mode,
                         "-f", "json", "--output", str(y_path)], {"PYTHONPATH": str(repo)}, tmp_path)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert (report["eps"], report["momentum"], report["from_layer"]) == (pytest.approx(1e-3), 0.03, ["eps", "momentum"])
        reference = bn.train(mode == "train")
        expected = reference(x.clone()).detach()
        torch.testing.assert_close(torch.load(y_path, weights_only=True), expected, rtol=0, atol=2e-6)
        if mode == "train":
            got = [c["running_var"] for c in report["channels"]]
            np.testing.assert_allclose(got, reference.running_var.double().numpy(), rtol=1e-6)
    done = _run_cli(["normalize", str(tmp_path / "x.pt"), "-c", str(out / "bare.pt"), "-l", "model.1.bn", "--mode", "eval",
                     "--eps", "1e-5", "-f", "json"], {"PYTHONPATH": str(repo)}, tmp_path)
    report = json.loads(done.stdout)
    assert (report["eps"], report["from_layer"]) == (1e-5, ["momentum"])  # an option given wins


def test_table_shows_eps_and_class_for_whole_models_only(saved, tmp_path):
    out, ref = saved
    repo = Path(__file__).resolve().parent.parent
    env = {"PYTHONPATH": str(repo), "NO_COLOR": "1"}
    wide = _run_cli(["inspect", str(out / "bare.pt")], {**env, "COLUMNS": "200"}, tmp_path).stdout
    rows = {line.split()[0]: line for line in wide.splitlines() if "│" in line and line.split()[0] != "│"}
    assert "FrozenBatchNorm2d" in rows["frozen"] and " 0 │" in rows["frozen"]  # its eps, 0
    assert "SyncBatchNorm" in rows["sync"] and "0.001" in rows["model.1.bn"]
    narrow = _run_cli(["inspect", str(out / "bare.pt")], {**env, "COLUMNS": "80"}, tmp_path).stdout
    header = next(line for line in narrow.splitlines() if line.startswith("layer"))
    assert "eps" in header and "class" not in header  # eps is kept longest, class dropped first
    assert "columns: class, " in narrow  # and the dim line says so
    plain = _run_cli(["inspect", str(out / "state_dict.pt")], {**env, "COLUMNS": "200"}, tmp_path).stdout
    assert " eps " not in plain and "class" not in plain


def test_normalize_given_a_whole_model_as_input_says_it_is_a_checkpoint(saved, cli):
    out, _ = saved
    result = cli("normalize", out / "yolov5.pt")
    assert result.exit_code == 3
    assert "a checkpoint with 9 BatchNorm layers" in result.stderr and "under 'model'" in result.stderr
    assert f"--checkpoint {out / 'yolov5.pt'} --layer model.0.bn" in result.stderr
