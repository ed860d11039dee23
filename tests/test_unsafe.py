"""Files that would run code when unpickled are refused, and the code never runs: zip, legacy, TorchScript, env vars."""

from __future__ import annotations

import argparse
import pickle
from collections import OrderedDict

import pytest

from bncli.errors import UnsafeFileError
from bncli.loading import load_checkpoint, load_tensor

ADVICE = "Re-save only the weights where you trust the file (torch.save(model.state_dict(), ...)) or convert it to safetensors"


class MarkerOnLoad:
    """Unpickling this calls open(marker, "w"): the marker file appears if anything ever unpickles it for real."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(tmp_path, legacy: bool):
    import torch
    from conftest import bn_state

    marker = tmp_path / "MARKER"
    sd = bn_state()
    sd["payload"] = MarkerOnLoad(str(marker))
    path = tmp_path / ("evil_legacy.pt" if legacy else "evil.pt")
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    return path, marker


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reduce_payload_refused_and_never_runs(tmp_path, legacy):
    path, marker = _evil(tmp_path, legacy)
    with pytest.raises(UnsafeFileError) as info:
        load_checkpoint(path)
    assert info.value.message == (
        f"{path}: refused: it holds pickled objects that would import io.open; bncli loads only tensors and plain "
        f"containers, because importing other globals can run arbitrary code. {ADVICE}"
    )
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    "env",
    [
        {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
        {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "0"},
        {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"},
    ],
    ids=["no-weights-only", "weights-only-0", "both"],
)
def test_env_vars_cannot_turn_safety_off(tmp_path, monkeypatch, legacy, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path, marker = _evil(tmp_path, legacy)
    with pytest.raises(UnsafeFileError, match="would import io.open"):
        load_checkpoint(path)
    assert not marker.exists()


def test_env_vars_do_not_break_good_files(make_ckpt, monkeypatch):
    from conftest import bn_state

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")  # both at once makes a bare torch.load raise
    ckpt = load_checkpoint(make_ckpt(bn_state()))
    assert list(ckpt) == list(bn_state())
    import os

    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored after the load


def test_torch_load_always_called_with_weights_only(make_ckpt, tmp_path, monkeypatch):
    import torch
    from conftest import bn_state

    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    import bncli.loading

    monkeypatch.setattr(bncli.loading, "_torchzip_load", lambda path: None)  # zip files torchzip hands over
    load_checkpoint(make_ckpt(bn_state()))
    legacy = tmp_path / "legacy.pt"
    torch.save(bn_state(), legacy, _use_new_zipfile_serialization=False)
    load_checkpoint(legacy)
    load_tensor(make_ckpt(torch.ones(2, 3, 4, 4), "t.pt"))
    assert len(calls) == 3
    for kwargs in calls:
        assert kwargs["weights_only"] is True
        assert "pickle_module" not in kwargs


def test_whole_module_refused_names_the_class(make_ckpt):
    import torch

    path = make_ckpt(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), "module.pt")
    with pytest.raises(UnsafeFileError) as info:
        load_checkpoint(path)
    assert "torch.nn.modules.batchnorm.BatchNorm2d" in info.value.message
    assert "torch.nn.modules.container.Sequential" in info.value.message
    assert info.value.message.endswith(ADVICE)


def test_argparse_namespace_refused(make_ckpt):
    from conftest import bn_state

    path = make_ckpt({"model": bn_state(), "args": argparse.Namespace(lr=0.1)})
    with pytest.raises(UnsafeFileError, match="would import argparse.Namespace;"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_refused(tmp_path):
    import torch

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.BatchNorm2d(3)), str(path))
    with pytest.raises(UnsafeFileError) as info:
        load_checkpoint(path)
    assert info.value.message == (
        f"{path}: a TorchScript archive; bncli never runs TorchScript code. "
        "Save model.state_dict() with torch.save, or convert it to safetensors"
    )


def test_plain_pickle_never_unpickled(tmp_path):
    from bncli.errors import InputError

    marker = tmp_path / "MARKER"
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"x": MarkerOnLoad(str(marker))}, protocol=4))
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message == (
        f"{path}: a Python pickle that torch.save did not write; bncli never unpickles arbitrary files. "
        "Save the tensors with torch.save or safetensors"
    )
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_cli_exit_3_and_marker_absent(cli, tmp_path, legacy):
    path, marker = _evil(tmp_path, legacy)
    out = tmp_path / "out.pt"
    for args in (("inspect", path), ("normalize", path, "--output", out)):
        result = cli(*args)
        assert result.exit_code == 3, result
        assert result.stderr.count("\n") == 1 and "would import io.open" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert not marker.exists() and not out.exists()


def test_safe_containers_still_load(make_ckpt):
    """OrderedDict, plain dicts, lists of numbers and strings are in torch's allowlist: no refusal for them."""
    from conftest import bn_state

    path = make_ckpt({"state_dict": OrderedDict(bn_state()), "epoch": 3, "arch": "resnet", "history": [0.1, 0.2]})
    assert load_checkpoint(path).provenance.container == "state_dict"
