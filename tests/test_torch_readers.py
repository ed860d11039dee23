"""bncli's torch readers (bncli/formats/) against torch.load, tensor for tensor, zip and legacy; refusals."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from bncli.errors import ExitCode, InputError
from bncli.formats.tensors import LazyTensor
from bncli.loading import load_checkpoint, read_torch, sniff

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_data"


def _read(path):
    """The object bncli's reader makes of a torch file (zip or legacy, by its bytes)."""
    return read_torch(Path(path), sniff(Path(path)))[0]


def _same(ref, got, where="obj"):
    """Recursively: every torch tensor equals the LazyTensor in its place (values, shape, dtype name)."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, LazyTensor), where
        assert got.dtype == str(ref.dtype).removeprefix("torch."), where
        assert got.shape == tuple(ref.shape), where
        expected = ref.detach()
        expected = expected.float() if expected.dtype == torch.bfloat16 else expected
        array = np.asarray(got)
        assert array.dtype == expected.numpy().dtype, where
        np.testing.assert_array_equal(array, expected.numpy(), err_msg=where)
    elif isinstance(ref, dict):
        assert type(got) is type(ref), where
        assert list(got) == list(ref), where
        for key in ref:
            _same(ref[key], got[key], f"{where}[{key!r}]")
    elif isinstance(ref, (list, tuple)):
        assert type(got) is type(ref) and len(got) == len(ref), where
        for i, (a, b) in enumerate(zip(ref, got, strict=True)):
            _same(a, b, f"{where}[{i}]")
    else:
        assert got == ref and type(got) is type(ref), where


def _module_state():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    net.train()
    net(torch.randn(4, 3, 3, 3))  # real running statistics and num_batches_tracked
    return net.state_dict()


def _views():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    return {"base": base, "t": base.t(), "slice": base[1:5, 2:9:3], "offset": base[3], "col": base[:, 7], "scalar": base[2, 2]}


CASES = {
    "module_state_dict": lambda: _module_state(),
    "wrapped": lambda: {"state_dict": _module_state(), "epoch": 3, "arch": "net", "best": 0.5, "flag": True, "none": None},
    "dtypes": lambda: {
        name: (torch.randn(5) * 10).to(getattr(torch, name))
        for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
    },
    "num_batches_tracked": lambda: OrderedDict(n=torch.tensor(123456789012), zero_d=torch.tensor(2.5)),
    "views_share_storage": _views,
    "nested": lambda: {"a": [(_views()["slice"], 1.5), {"b": torch.ones(2, 3)}], "c": ({"d": torch.zeros(0, 4)},)},
    "parameter": lambda: OrderedDict(
        p=torch.nn.Parameter(torch.randn(3, 2)), q=torch.nn.Parameter(torch.ones(2), requires_grad=False)
    ),
    "python_values": lambda: {"bytes": b"\x00\xffabc", "set": {1, 2}, "complex": 1 + 2j, "counter": Counter("aab"), "big": 2**70},
    "empty_and_large_dims": lambda: {"empty": torch.empty(0), "wide": torch.randn(1, 1, 1, 300)},
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_load(tmp_path, case, legacy):
    path = tmp_path / f"{case}.pt"
    torch.save(CASES[case](), path, _use_new_zipfile_serialization=not legacy)
    _same(torch.load(path, weights_only=True), _read(path))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_any_pickle_protocol(tmp_path, protocol):
    """torch.save(pickle_protocol=4) is ordinary; torch's weights_only unpickler refuses it, bncli reads it."""
    path = tmp_path / "p.pt"
    torch.save(CASES["wrapped"](), path, pickle_protocol=protocol)
    _same(torch.load(path, weights_only=False), _read(path))


@pytest.mark.parametrize("name", ["model.pt", "model_defects.pt", "input.pt", "input_nhwc.pt", "activations.pt"])
def test_matches_torch_load_on_sample_data(name):
    _same(torch.load(SAMPLES / name, weights_only=True), _read(SAMPLES / name))


def test_views_share_one_storage(tmp_path):
    path = tmp_path / "views.pt"
    torch.save(_views(), path)
    got = _read(path)
    assert len({id(t.storage) for t in got.values()}) == 1
    assert got["slice"].offset == 12 and got["slice"].stride == (10, 3)


def test_big_endian_byteorder_record(tmp_path):
    path = tmp_path / "be.pt"
    torch.save({"x": torch.tensor([1.5, -2.0, 3.25])}, path)
    _rewrite(path, lambda name, data: b"big" if name.endswith("/byteorder") else _byteswap(name, data, 4))
    np.testing.assert_array_equal(np.asarray(_read(path)["x"]), [1.5, -2.0, 3.25])


def _byteswap(name, data, itemsize):
    if "/data/" not in name:
        return data
    return np.frombuffer(data, dtype=f"<u{itemsize}").byteswap().tobytes()


def _rewrite(path: Path, change, compress=zipfile.ZIP_STORED):
    """Rebuild the archive with each record's bytes passed through change(name, data)."""
    with zipfile.ZipFile(path) as zf:
        records = [(i.filename, change(i.filename, zf.read(i.filename))) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in records:
            zf.writestr(name, data)


# --------------------------------------------------------------------------- refusals


class Boom:
    """Pickles as a call to subprocess: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, ([sys.executable, "-c", f"open({str(self.marker)!r}, 'w').write('ran')"],))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_a_record_and_a_bn012_finding(tmp_path, cli, legacy):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _module_state(), "hook": Boom(marker)}, path, _use_new_zipfile_serialization=not legacy)
    result = cli("inspect", path)
    assert result.exit_code == ExitCode.OK, result
    # protocol 2 spells subprocess by its Python 2 name; either way the call is named
    assert re.search(r"BN012 pickled-code .*would import 1 global \((subprocess|commands)\.call\) and call", result.stdout)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _rewrite(p, lambda n, d: d[:-4] if "/data/" in n else d), "which holds"),
        (lambda p: _rewrite(p, lambda n, d: d, compress=zipfile.ZIP_DEFLATED), "is compressed; torch stores records uncompressed"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "the file ends before its zip directory"),
    ],
    ids=["short-record", "deflated", "truncated"],
)
def test_damaged_archives_are_refused(tmp_path, damage, message):
    path = tmp_path / "odd.pt"
    torch.save(_module_state(), path)
    damage(path)
    with pytest.raises(InputError, match=message):
        _read(path)


def test_damaged_storage_bytes_are_an_input_error(tmp_path, cli):
    path = tmp_path / "flipped.pt"
    state = _module_state()
    torch.save(state, path)
    data = bytearray(path.read_bytes())
    raw = state["1.running_var"].numpy().tobytes()
    at = bytes(data).index(raw)
    data[at] ^= 0xFF  # flip one byte of running_var: the CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"corrupt: record '.*/data/\d+' fails its CRC-32 check"):
        np.asarray(_read(path)["1.running_var"])
    result = cli("inspect", path)
    assert result.exit_code == ExitCode.INPUT, result
    assert result.stderr.startswith(f"error: {path}: corrupt: record ")


def test_load_checkpoint_uses_the_reader(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": _module_state()}, path)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt["1.running_var"], LazyTensor)
    assert ckpt.provenance.container == "model" and ckpt.dtype("1.num_batches_tracked") == "int64"
    np.testing.assert_array_equal(ckpt.read("1.running_var"), _module_state()["1.running_var"].numpy())


def _all_tensors(obj):
    if isinstance(obj, LazyTensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _all_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _all_tensors(value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_damaged_bytes_never_escape_as_other_errors(tmp_path, legacy):
    """Any single damaged byte: a result or an InputError, never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    clean = tmp_path / "clean.pt"
    torch.save({"state_dict": _module_state(), "epoch": 2}, clean, _use_new_zipfile_serialization=not legacy)
    original = clean.read_bytes()
    path = tmp_path / "damaged.pt"

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, len(original) - 1), st.integers(0, 255))
    def check(at, value):
        data = bytearray(original)
        data[at] = value
        path.write_bytes(bytes(data))
        try:
            fmt = sniff(path)
            if fmt in ("torch-zip", "torch-legacy"):
                for tensor in _all_tensors(read_torch(path, fmt)[0]):
                    np.asarray(tensor)
        except InputError:
            pass

    check()
