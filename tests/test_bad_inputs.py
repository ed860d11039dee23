"""A corpus of bad inputs, generated here: each gives its exit code, one clear stderr line, no traceback, no output file."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from badfiles import declare_size, edit_pickle, f32, record, set_method
from badfiles import safetensors as st
from conftest import ROOT, bn_state
from safetensors.torch import save_file

from bncli.console import show

CASES = {}


def case(code: int, cause: str):
    """Register a builder: (tmp_path) -> path; `inspect` must exit with `code`, and `cause` appear in its message."""

    def register(build):
        CASES[build.__name__] = (build, code, cause)
        return build

    return register


def _pt(tmp_path, obj, name="ckpt.pt", legacy=False):
    path = tmp_path / name
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _write(tmp_path, data: bytes, name="bad.pt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _sd(**override):
    sd = bn_state(4)
    for key, value in override.items():
        sd[f"bn.{key}"] = value
    return sd


# --------------------------------------------------------------------------- not files, or not checkpoints


@case(3, "not a checkpoint bncli can read (looks like: empty file)")
def empty_file(tmp_path):
    return _write(tmp_path, b"")


@case(3, "directory")  # normalize: "is a directory, not a file"; inspect expands it and finds no checkpoint in it
def directory(tmp_path):
    (tmp_path / "dir.pt").mkdir()
    return tmp_path / "dir.pt"


@case(3, "no such file")
def missing_path(tmp_path):
    return tmp_path / "missing.pt"


@case(3, "broken symbolic link (points to")
def dangling_symlink(tmp_path):
    (tmp_path / "link.pt").symlink_to(tmp_path / "gone.pt")
    return tmp_path / "link.pt"


@case(3, "not a regular file (a pipe, socket or device)")
def fifo(tmp_path):
    os.mkfifo(tmp_path / "pipe.pt")  # reading it would block forever: it must be refused unopened
    return tmp_path / "pipe.pt"


@case(3, "not a checkpoint bncli can read (looks like: empty file)")
def non_utf8_name(tmp_path):
    path = tmp_path / os.fsdecode(b"caf\xe9-\xff.pt")
    path.write_bytes(b"")
    return path


@case(3, "looks like: unknown binary data")
def random_bytes(tmp_path):
    return _write(tmp_path, np.random.default_rng(0).bytes(4096))


@case(3, "looks like: Git LFS pointer; run `git lfs pull` to fetch the real file")
def git_lfs_pointer(tmp_path):
    text = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 102400000\n"
    return _write(tmp_path, text.encode())


@case(3, "looks like: HDF5 (Keras .h5?)")
def hdf5(tmp_path):
    return _write(tmp_path, b"\x89HDF\r\n\x1a\n" + bytes(500), "model.h5")


@case(3, "looks like: protobuf, perhaps ONNX or a TensorFlow graph")
def onnx(tmp_path):
    return _write(tmp_path, b"\x08\x07\x12\x07pytorch\x1a\x052.1.0" + bytes(64), "model.onnx")


@case(3, "looks like: text")
def text_file(tmp_path):
    return _write(tmp_path, b"epoch,loss\n1,0.5\n2,0.4\n", "log.pt")


@case(3, "looks like: JSON text")
def json_file(tmp_path):
    return _write(tmp_path, json.dumps({"bn.running_mean": [0, 1]}).encode(), "config.pt")


@case(3, "looks like: gzip-compressed data; decompress it first")
def gzipped_checkpoint(tmp_path):
    raw = _pt(tmp_path, bn_state(), "inner.pt").read_bytes()
    return _write(tmp_path, gzip.compress(raw), "model.pt.gz")


@case(3, "not a checkpoint bncli can read (looks like: zip archive without data.pkl)")
def zip_without_data_pkl(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("weights/readme.txt", "hello")
    return _write(tmp_path, buf.getvalue(), "model.zip")


@case(3, "a numpy npz file holds tensors, not a checkpoint")
def npz_as_checkpoint(tmp_path):
    path = tmp_path / "arrays.npz"
    np.savez(path, x=np.ones((2, 3), np.float32))
    return path


@case(3, "a numpy npy file holds tensors, not a checkpoint")
def npy_as_checkpoint(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.ones((2, 3), np.float32))
    return path


@case(3, "a Python pickle that torch.save did not write; bncli never unpickles arbitrary files")
def plain_pickle(tmp_path):
    return _write(tmp_path, pickle.dumps({"bn.running_mean": np.zeros(3)}), "model.pkl")


# --------------------------------------------------------------------------- damaged torch files


@case(3, "truncated: the file ends before its zip directory (probably cut short, e.g. an interrupted download)")
def truncated_zip(tmp_path):
    raw = _pt(tmp_path, bn_state(), "good.pt").read_bytes()
    return _write(tmp_path, raw[: len(raw) // 2])


@case(3, "truncated: the file ends before its zip directory (probably cut short")
def zip_missing_last_byte(tmp_path):
    raw = _pt(tmp_path, bn_state(), "good.pt").read_bytes()
    return _write(tmp_path, raw[:-1])


@case(3, "its pickle is cut short (a truncated file?)")
def truncated_legacy_pickle(tmp_path):
    raw = _pt(tmp_path, bn_state(), "good.pt", legacy=True).read_bytes()
    return _write(tmp_path, raw[:200])


@case(3, "truncated: storage")
def legacy_missing_tensor_bytes(tmp_path):
    raw = _pt(tmp_path, bn_state(), "good.pt", legacy=True).read_bytes()
    return _write(tmp_path, raw[:-6])


@case(3, "truncated or corrupt: record")
def zip_declaring_gigabytes(tmp_path):
    raw = _pt(tmp_path, bn_state(), "good.pt").read_bytes()
    return _write(tmp_path, declare_size(raw, "data/0", 0xF000_0000))


@case(3, "corrupt torch archive: the pickle declares 1.0 KB for record 'good/data/0', which holds 16 bytes")
def pickle_larger_than_record(tmp_path):
    raw = _pt(tmp_path, OrderedDict(bn_state()), "good.pt").read_bytes()
    return _write(tmp_path, edit_pickle(raw, b"cpuq\x07K\x04t", b"cpuq\x07K\xfft"))


@case(3, "is compressed; torch stores records uncompressed")
def compressed_record(tmp_path):
    raw = _pt(tmp_path, bn_state(), "good.pt").read_bytes()
    return _write(tmp_path, set_method(raw, "data/1", 8))


@case(3, "fails its CRC-32 check (the file is damaged)")
def flipped_bit_in_data(tmp_path):
    raw = bytearray(_pt(tmp_path, bn_state(), "good.pt").read_bytes())
    _, r = record(bytes(raw), "data/3")
    raw[r["data"]] ^= 0x01
    return _write(tmp_path, bytes(raw))


@case(3, "a TorchScript archive; bncli never runs TorchScript code")
def torchscript(tmp_path):
    import warnings

    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.BatchNorm2d(3)), str(path))
    return path


@case(3, "corrupt torch archive: the pickle declares")
def pickle_past_end_of_file(tmp_path):
    raw = _pt(tmp_path, OrderedDict(bn_state()), "good.pt").read_bytes()
    # num_batches_tracked's storage, the last record, claims 255 int64 values: mapped, it would run past the file
    return _write(tmp_path, edit_pickle(raw, b"4q(h\x07K\x01t", b"4q(h\x07K\xfft"))


@case(3, "corrupt legacy torch file: storage")
def legacy_size_header_lies(tmp_path):
    raw = bytearray(_pt(tmp_path, bn_state(4), "good.pt", legacy=True).read_bytes())
    at = raw.index(b"\x04\x00\x00\x00\x00\x00\x00\x00", len(raw) - 5 * 8 - 4 * 4 * 4 - 8)
    raw[at] = 7
    return _write(tmp_path, bytes(raw))


# --------------------------------------------------------------------------- damaged safetensors


@case(3, "corrupt safetensors file: its header claims 1099511627776 bytes (the format allows 100 MB)")
def st_header_2_to_40(tmp_path):
    return _write(tmp_path, st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, f32([1]), header_len=2**40))


@case(3, "corrupt safetensors file: its header claims 5000 bytes but the file has")
def st_header_longer_than_file(tmp_path):
    return _write(tmp_path, st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, f32([1]), header_len=5000))


@case(3, "tensor 'bn.running_var' has unknown dtype 'F12'")
def st_unknown_dtype(tmp_path):
    return _write(tmp_path, st({"bn.running_var": {"dtype": "F12", "shape": [2], "data_offsets": [0, 8]}}, f32([1, 2])))


@case(3, "corrupt safetensors file: tensor 'bn.running_var' overlaps the tensor before it")
def st_overlapping_offsets(tmp_path):
    header = {
        "bn.running_mean": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "bn.running_var": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    return _write(tmp_path, st(header, f32([0, 1, 2])))


@case(3, "corrupt safetensors file: the key 'bn.running_var' appears twice in the header")
def st_duplicate_keys(tmp_path):
    entry = '"bn.running_var": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    return _write(tmp_path, st({}, f32([1]), raw_header=("{" + entry + ", " + entry + "}").encode()))


@case(3, "truncated safetensors file: tensor 'bn.running_var' ends at byte")
def st_offsets_past_end(tmp_path):
    header = {"bn.running_var": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    return _write(tmp_path, st(header, f32([1, 2])))


@case(3, "tensor 'bn.running_var' of shape (3,) and dtype F32 needs 12 bytes but its offsets span 8")
def st_size_does_not_match_shape(tmp_path):
    return _write(tmp_path, st({"bn.running_var": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, f32([1, 2])))


@case(3, "corrupt safetensors file: its header is not valid JSON")
def st_header_not_json(tmp_path):
    return _write(tmp_path, st({}, b"", raw_header=b'{"bn.running_var": {"dtype": "F32", "shape": [1], '))


@case(3, "corrupt safetensors file: a gap of 4 bytes before tensor 'bn.running_var'")
def st_gap(tmp_path):
    return _write(tmp_path, st({"bn.running_var": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, f32([1, 2])))


@case(3, "has data_offsets [8, 0]")
def st_reversed_offsets(tmp_path):
    return _write(tmp_path, st({"bn.running_var": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, f32([1, 2])))


@case(3, "has dtype float8_e4m3fn; BatchNorm parameters and statistics must be float16, bfloat16, float32 or float64")
def st_float8_statistics(tmp_path):
    header = {
        "bn.running_mean": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]},
        "bn.running_var": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [2, 4]},
    }
    return _write(tmp_path, st(header, b"\x38\x38\x38\x38"))


@case(3, "corrupt safetensors file: its header is not valid JSON (maximum recursion depth exceeded")
def st_deeply_nested_header(tmp_path):
    return _write(tmp_path, st({}, b"", raw_header=b"{" + b'"a":' * 1 + b"[" * 100_000 + b"]" * 100_000 + b"}"))


@case(3, "corrupt safetensors file: __metadata__ must map strings to strings")
def st_bad_metadata(tmp_path):
    header = {"__metadata__": {"format": 3}, "bn.running_var": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    return _write(tmp_path, st(header, f32([1])))


# --------------------------------------------------------------------------- wrong contents


@case(1, "lengths differ: running_mean 4, running_var 5")
def mean_and_var_lengths_differ(tmp_path):
    return _pt(tmp_path, _sd(running_var=torch.ones(5)))


@case(3, "bn.running_mean has dtype int64; BatchNorm parameters and statistics must be float16")
def integer_statistics(tmp_path):
    return _pt(tmp_path, _sd(running_mean=torch.zeros(4, dtype=torch.int64)))


@case(3, "bn.running_var has dtype bool")
def bool_statistics(tmp_path):
    return _pt(tmp_path, _sd(running_var=torch.ones(4, dtype=torch.bool)))


@case(3, "bn.running_var has dtype complex64")
def complex_statistics(tmp_path):
    return _pt(tmp_path, _sd(running_var=torch.ones(4, dtype=torch.complex64)))


@case(3, "bn.running_var has dtype int32")
def st_integer_statistics(tmp_path):
    path = tmp_path / "int.safetensors"
    save_file({"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4, dtype=torch.int32)}, str(path))
    return path


@case(1, "the layer has 0 channels")
def zero_length_layer(tmp_path):
    return _pt(tmp_path, _sd(weight=torch.ones(0), bias=torch.ones(0), running_mean=torch.ones(0), running_var=torch.ones(0)))


@case(1, "running_var is NaN in channel(s) 1")
def nan_statistics(tmp_path):
    return _pt(tmp_path, _sd(running_var=torch.tensor([1.0, float("nan"), 1.0, 1.0])))


@case(1, "running_mean is Inf in channel(s) 0, 3")
def inf_statistics(tmp_path):
    return _pt(tmp_path, _sd(running_mean=torch.tensor([float("inf"), 0.0, 0.0, float("-inf")])))


@case(3, "bn.running_var has shape (2, 2); BatchNorm tensors are 1-D (num_features,)")
def two_dimensional_statistics(tmp_path):
    return _pt(tmp_path, _sd(running_var=torch.ones(2, 2)))


@case(3, "bn.num_batches_tracked has shape (2,); expected a single count")
def num_batches_tracked_two_values(tmp_path):
    return _pt(tmp_path, _sd(num_batches_tracked=torch.tensor([1, 2])))


@case(3, "bn.num_batches_tracked is nan; expected an integer count")
def num_batches_tracked_nan(tmp_path):
    return _pt(tmp_path, _sd(num_batches_tracked=torch.tensor(float("nan"))))


@case(3, "cannot read bn.num_batches_tracked (a plain integer of 201 bits, beyond int64)")
def num_batches_tracked_beyond_int64(tmp_path):
    return _pt(tmp_path, _sd(num_batches_tracked=2**200))  # a plain int in the pickle can be any size


@case(3, "bn.num_batches_tracked is 2.5; expected an integer count")
def num_batches_tracked_fraction(tmp_path):
    return _pt(tmp_path, _sd(num_batches_tracked=torch.tensor(2.5, dtype=torch.float64)))


@case(3, "holds a list at the top level, not a state dict")
def list_at_top_level(tmp_path):
    return _pt(tmp_path, [torch.ones(3), torch.zeros(3)])


@case(3, "holds a single tensor, not a checkpoint; use `bncli normalize` for tensors")
def bare_tensor_as_checkpoint(tmp_path):
    return _pt(tmp_path, torch.ones(3), "tensor.pt")


@case(3, "no state dict of tensors found; top-level keys: epoch, arch")
def dict_without_tensors(tmp_path):
    return _pt(tmp_path, {"epoch": 3, "arch": "resnet"})


@case(3, "holds a NoneType at the top level, not a state dict")
def none_at_top_level(tmp_path):
    return _pt(tmp_path, None)


# --------------------------------------------------------------------------- the tests


def _one_error_line(result, path, cause: str | None = None) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result
    line = result.stderr.rstrip("\n")
    assert line.startswith("error: "), result
    assert show(path) in line, result  # the file is named (printable even when its name is not UTF-8)
    if cause is not None:
        assert cause in line, result
    return line


def test_corpus_is_big_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_inspect(cli, tmp_path, name):
    build, code, cause = CASES[name]
    path = build(tmp_path)
    result = cli("inspect", path)
    assert result.exit_code == code, result
    if code == 3:
        _one_error_line(result, path, cause)
    else:  # a damaged layer is a finding, reported like any other, not an input error
        assert result.stderr == "" and cause in cli("inspect", path, "--layer", "bn", "--format", "json").stdout, result
        assert "Traceback" not in result.stdout


@pytest.mark.parametrize("name", sorted(CASES))
def test_normalize_writes_nothing(cli, tmp_path, name):
    """As normalize's input (a tensor is expected) every case is an input error, and no output file appears."""
    build, _, _ = CASES[name]
    path = build(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = sorted(os.listdir(tmp_path))
    result = cli("normalize", path, "--output", out_dir / "result.pt")
    assert result.exit_code == 3, result
    _one_error_line(result, path)
    assert os.listdir(out_dir) == []
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("name", ["pickle_larger_than_record", "integer_statistics", "st_unknown_dtype", "torchscript"])
def test_as_normalize_checkpoint(cli, tmp_path, name):
    """Bad files given as --checkpoint to normalize fail the same way, and write nothing."""
    build, _, cause = CASES[name]
    path = build(tmp_path)
    x = tmp_path / "x.pt"
    torch.save(torch.randn(2, 4, 3, 3), x)
    out = tmp_path / "y.pt"
    result = cli("normalize", x, "--checkpoint", path, "--layer", "bn", "--output", out)
    assert result.exit_code == 3, result
    _one_error_line(result, path, cause)
    assert not out.exists()


def test_internal_error_is_one_line_exit_4(cli, monkeypatch):
    from conftest import SAMPLES

    import bncli.audit

    def broken(keys):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(bncli.audit, "find_layers", broken)
    result = cli("inspect", SAMPLES / "model.pt")
    assert result.exit_code == 4
    assert result.stderr == "error: internal error: ZeroDivisionError: simulated bug (rerun with --debug for the traceback)\n"
    debug = cli("--debug", "inspect", SAMPLES / "model.pt")
    assert debug.exit_code == 4 and "Traceback" in debug.stderr and "simulated bug" in debug.stderr


def test_real_process_non_utf8_name_and_damage(tmp_path):
    """Outside CliRunner: a real process, a file name that is not UTF-8, a damaged archive."""
    raw = _pt(tmp_path, bn_state(), "good.pt").read_bytes()
    name = os.fsencode(tmp_path) + b"/mod\xe8le-\xff.pt"
    with open(name, "wb") as fh:
        fh.write(raw[:-1])
    proc = subprocess.run(
        [sys.executable, "-m", "bncli", "inspect", name], cwd=ROOT, capture_output=True, env={**os.environ, "NO_COLOR": "1"}
    )
    assert proc.returncode == 3
    stderr = proc.stderr.decode("utf-8")
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "mod\\xe8le-\\xff.pt: truncated: the file ends before its zip directory" in stderr
    assert b"Traceback" not in proc.stderr + proc.stdout
