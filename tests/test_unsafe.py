"""Files that would run code when unpickled are refused, and the code never runs: zip, legacy, TorchScript, env vars."""

from __future__ import annotations

import argparse
import pickle
from collections import OrderedDict

import pytest

from bncli.errors import InputError, UnsafeFileError
from bncli.loading import load_checkpoint, load_tensor

_ADVICE = "Re-save only the weights where you trust the file (torch.save(model.state_dict(), ...)) or convert it to safetensors"


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
def test_reduce_payload_is_read_as_data_and_never_runs(tmp_path, legacy):
    path, marker = _evil(tmp_path, legacy)
    ckpt = load_checkpoint(path)
    assert ckpt.provenance.pickled_globals == ("io.open",)
    assert ckpt.provenance.pickled_calls == ("io.open",)
    assert "bn.running_var" in ckpt
    with pytest.raises(InputError, match=r"a value built by io\.open\(\), whose values bncli does not read"):
        ckpt.read("payload")  # a record where a tensor could be: kept, unreadable, never silently dropped
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
def test_env_vars_change_nothing(tmp_path, monkeypatch, legacy, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path, marker = _evil(tmp_path, legacy)
    assert load_checkpoint(path).provenance.pickled_globals == ("io.open",)
    assert not marker.exists()


def test_env_vars_do_not_break_good_files(make_ckpt, monkeypatch):
    from conftest import bn_state

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")  # both at once makes a bare torch.load raise
    ckpt = load_checkpoint(make_ckpt(bn_state()))
    assert list(ckpt) == list(bn_state())


def test_torch_load_is_never_called_to_read(make_ckpt, tmp_path, monkeypatch):
    """inspect, diff and normalize read torch files with bncli's own reader: torch.load is not even called."""
    import torch
    from conftest import bn_state

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    load_checkpoint(make_ckpt(bn_state()))
    legacy = tmp_path / "legacy.pt"
    torch.save(bn_state(), legacy, _use_new_zipfile_serialization=False)
    load_checkpoint(legacy)
    load_tensor(make_ckpt(torch.ones(2, 3, 4, 4), "t.pt"))


def test_torch_load_for_rewriting_is_weights_only_after_bncli_checks(make_ckpt, monkeypatch):
    """recalibrate hands torch objects back to torch: torch.load(weights_only=True), never a pickle_module."""
    import torch
    from conftest import bn_state

    from bncli.loading import torch_load_checked

    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch_load_checked(make_ckpt(bn_state()), "torch-zip")
    assert calls and all(k["weights_only"] is True and "pickle_module" not in k for k in calls)


def test_torch_load_for_rewriting_refuses_pickled_code(tmp_path, monkeypatch):
    import torch

    from bncli.loading import torch_load_checked

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    path, marker = _evil(tmp_path, False)
    with pytest.raises(UnsafeFileError, match="would import io.open; bncli reads such files as data"):
        torch_load_checked(path, "torch-zip")
    assert not marker.exists()


def test_whole_module_is_read_as_data(make_ckpt):
    import torch

    path = make_ckpt(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), "module.pt")
    ckpt = load_checkpoint(path)
    assert ckpt.provenance.model_class == "torch.nn.modules.container.Sequential"
    assert "torch.nn.modules.batchnorm.BatchNorm2d" in ckpt.provenance.pickled_globals
    assert list(ckpt) == ["0.weight", "0.bias", "0.running_mean", "0.running_var", "0.num_batches_tracked"]


def test_argparse_namespace_is_named(make_ckpt):
    from conftest import bn_state

    path = make_ckpt({"model": bn_state(), "args": argparse.Namespace(lr=0.1)})
    ckpt = load_checkpoint(path)
    assert ckpt.provenance.container == "model" and ckpt.provenance.pickled_globals == ("argparse.Namespace",)


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
def test_cli_reports_bn012_and_marker_absent(cli, tmp_path, legacy):
    path, marker = _evil(tmp_path, legacy)
    result = cli("inspect", path, "--format", "json")
    assert result.exit_code == 0, result  # a warning: below the default --fail-on error
    import json

    findings = json.loads(result.stdout)["files"][0]["findings"]
    assert [(f["rule"], f["severity"]) for f in findings] == [("BN012", "warning")]
    assert "import 1 global (io.open) and call" not in findings[0]["message"]  # io.open is not in DANGEROUS_CALLS
    assert cli("inspect", path, "--fail-on", "warning").exit_code == 1
    assert cli("inspect", path, "--fail-on", "warning", "--ignore", "pickled-code").exit_code == 0
    assert not marker.exists()


def test_safe_containers_still_load(make_ckpt):
    """OrderedDict, plain dicts, lists of numbers and strings are in torch's allowlist: no refusal for them."""
    from conftest import bn_state

    path = make_ckpt({"state_dict": OrderedDict(bn_state()), "epoch": 3, "arch": "resnet", "history": [0.1, 0.2]})
    assert load_checkpoint(path).provenance.container == "state_dict"
