"""bncli.torchzip against torch.load(weights_only=True), tensor for tensor; refusals and fallbacks."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from bncli import torchzip
from bncli.errors import ExitCode, InputError
from bncli.loading import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_data"


def _same(ref, got, where="obj"):
    """Recursively: every torch tensor equals the LazyTensor in its place (values, shape, dtype name)."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torchzip.LazyTensor), where
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
        assert getattr(got, "_metadata", None) == getattr(ref, "_metadata", None), where
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_load(tmp_path, case):
    path = tmp_path / f"{case}.pt"
    torch.save(CASES[case](), path)
    _same(torch.load(path, weights_only=True), torchzip.load(path))


@pytest.mark.parametrize("name", ["model.pt", "model_defects.pt", "input.pt", "input_nhwc.pt", "activations.pt"])
def test_matches_torch_load_on_sample_data(name):
    _same(torch.load(SAMPLES / name, weights_only=True), torchzip.load(SAMPLES / name))


def test_views_share_one_storage(tmp_path):
    path = tmp_path / "views.pt"
    torch.save(_views(), path)
    got = torchzip.load(path)
    assert len({id(t.storage) for t in got.values()}) == 1
    assert got["slice"].offset == 12 and got["slice"].stride == (10, 3)


def test_big_endian_byteorder_record(tmp_path):
    path = tmp_path / "be.pt"
    torch.save({"x": torch.tensor([1.5, -2.0, 3.25])}, path)
    _rewrite(path, lambda name, data: b"big" if name.endswith("/byteorder") else _byteswap(name, data, 4))
    np.testing.assert_array_equal(np.asarray(torchzip.load(path)["x"]), [1.5, -2.0, 3.25])


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


def test_malicious_pickle_never_runs(tmp_path, cli):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _module_state(), "hook": Boom(marker)}, path)
    with pytest.raises(torchzip.Unsupported, match="global subprocess.call"):
        torchzip.load(path)
    result = cli("inspect", path)  # falls back to torch.load(weights_only=True), which refuses
    assert result.exit_code == ExitCode.INPUT, result
    assert result.stderr.startswith(f"error: {path}: refused: it holds pickled objects that would import ")
    # protocol 2 spells subprocess by its Python 2 name, which torch's report keeps
    assert re.search(r"would import (subprocess|commands)\.call; ", result.stderr)
    assert not marker.exists()


def test_pickled_module_is_left_to_torch(tmp_path, cli):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.BatchNorm2d(4), path)
    with pytest.raises(torchzip.Unsupported, match="global torch.nn.modules.batchnorm.BatchNorm2d"):
        torchzip.load(path)
    result = cli("inspect", path)
    assert result.exit_code == ExitCode.INPUT, result
    assert "refused: it holds pickled objects that would import torch.nn.modules.batchnorm.BatchNorm2d" in result.stderr


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _rewrite(p, lambda n, d: d[:-4] if "/data/" in n else d), "smaller than its storage"),
        (lambda p: _rewrite(p, lambda n, d: b"\x80\x04" + d[2:] if n.endswith("data.pkl") else d), "not a protocol-2"),
    ],
    ids=["short-record", "protocol-4"],
)
def test_odd_archives_fall_back(tmp_path, damage, message):
    path = tmp_path / "odd.pt"
    torch.save(_module_state(), path)
    damage(path)
    with pytest.raises(torchzip.Unsupported, match=message):
        torchzip.load(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _rewrite(p, lambda n, d: d, compress=zipfile.ZIP_DEFLATED), "is compressed; torch stores records uncompressed"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "the file ends before its zip directory"),
    ],
    ids=["deflated", "truncated"],
)
def test_damaged_archives_are_refused_as_on_the_torch_path(tmp_path, damage, message):
    """The reader shares bncli.archive.check_torch_zip with the torch.load path: the same damage, the same error."""
    path = tmp_path / "odd.pt"
    torch.save(_module_state(), path)
    damage(path)
    with pytest.raises(InputError, match=message):
        torchzip.load(path)


def test_opcode_torch_refuses_is_not_accepted(tmp_path):
    path = tmp_path / "dup.pt"
    torch.save({"x": 1}, path)
    # protocol 2, but INT (a text opcode torch's weights_only unpickler does not implement)
    _rewrite(path, lambda n, d: b"\x80\x02I7\n." if n.endswith("data.pkl") else d)
    with pytest.raises(torchzip.Unsupported, match="opcode INT"):
        torchzip.load(path)


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
        np.asarray(torchzip.load(path)["1.running_var"])
    result = cli("inspect", path)
    assert result.exit_code == ExitCode.INPUT, result
    assert result.stderr.startswith(f"error: {path}: corrupt: record ")


def test_load_checkpoint_uses_the_reader(tmp_path, monkeypatch):
    path = tmp_path / "plain.pt"
    torch.save({"model": _module_state()}, path)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt["1.running_var"], torchzip.LazyTensor)
    assert ckpt.provenance.container == "model" and ckpt.dtype("1.num_batches_tracked") == "int64"
    np.testing.assert_array_equal(ckpt.read("1.running_var"), _module_state()["1.running_var"].numpy())


def test_load_checkpoint_falls_back_to_torch(tmp_path):
    path = tmp_path / "deflated.pt"
    torch.save(_module_state(), path)
    _rewrite(path, lambda n, d: d, compress=zipfile.ZIP_DEFLATED)
    # torch reads deflated archives itself (whether it should is loading.py's business): not a LazyTensor
    try:
        ckpt = load_checkpoint(path)
    except InputError:
        return  # zip validation in loading.py may refuse compressed records; either way torchzip stepped aside
    assert isinstance(ckpt["1.running_var"], torch.Tensor)


def test_pickle_bytes_written_by_torch_are_protocol_2():
    buffer = io.BytesIO()
    torch.save({"a": torch.ones(1)}, buffer)
    with zipfile.ZipFile(buffer) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        assert zf.read(pkl)[:2] == b"\x80\x02"


def _all_tensors(obj):
    if isinstance(obj, torchzip.LazyTensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _all_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _all_tensors(value)


def test_damaged_bytes_never_escape_as_other_errors(tmp_path):
    """Any single damaged byte: a result, Unsupported (torch decides) or InputError, never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    clean = tmp_path / "clean.pt"
    torch.save({"state_dict": _module_state(), "epoch": 2}, clean)
    original = clean.read_bytes()
    path = tmp_path / "damaged.pt"

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, len(original) - 1), st.integers(0, 255))
    def check(at, value):
        data = bytearray(original)
        data[at] = value
        path.write_bytes(bytes(data))
        try:
            for tensor in _all_tensors(torchzip.load(path)):
                np.asarray(tensor)
        except (torchzip.Unsupported, InputError):
            pass

    check()


def test_bytearray_bomb_is_refused_without_allocating(tmp_path, cli):
    """816 bytes that would make torch.load allocate 2 GB: refused before any allocation, by both readers' gate."""
    import resource

    path = tmp_path / "bomb.pt"
    torch.save({"x": torch.ones(2)}, path)
    bomb = b"\x80\x02c__builtin__\nbytearray\nJ\xff\xff\xff\x7f\x85R."  # bytearray(2**31 - 1)
    _rewrite(path, lambda n, d: bomb if n.endswith("data.pkl") else d)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=r"refused: its pickle asks for bytearray\(2147483647\)"):
        torchzip.load(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: nothing like 2 GB
    result = cli("inspect", path)
    assert result.exit_code == ExitCode.INPUT and "bytearray(2147483647)" in result.stderr
