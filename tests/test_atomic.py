"""write_atomic: a failure or an interrupt part-way leaves the old file untouched and no temporary file behind."""

import os

import pytest

from bncli.atomic import write_atomic
from bncli.errors import InputError

OLD = b"old contents, must survive"


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "out.pt"
    path.write_bytes(OLD)
    return path


def _half_then(exc):
    def write(fh):
        fh.write(b"x" * 10_000)  # part of the new file is already on disk when the failure hits
        fh.flush()
        raise exc

    return write


def test_success_replaces_and_leaves_nothing_else(target):
    write_atomic(target, lambda fh: fh.write(b"new"))
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["out.pt"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # mkstemp's 0600 widened to what open() would give


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), ValueError("bad"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_old_file(target, exc):
    with pytest.raises(type(exc)):
        write_atomic(target, _half_then(exc))
    assert target.read_bytes() == OLD
    assert os.listdir(target.parent) == ["out.pt"]


def test_oserror_mid_write_is_an_input_error(target):
    with pytest.raises(InputError, match=r"out\.pt: cannot write: No space left on device"):
        write_atomic(target, _half_then(OSError(28, "No space left on device")))
    assert target.read_bytes() == OLD
    assert os.listdir(target.parent) == ["out.pt"]


def test_failure_in_fsync_keeps_old_file(target, monkeypatch):
    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(InputError, match="Input/output error"):
        write_atomic(target, lambda fh: fh.write(b"new"))
    assert target.read_bytes() == OLD
    assert os.listdir(target.parent) == ["out.pt"]


def test_new_file_not_created_on_failure(tmp_path):
    path = tmp_path / "fresh.pt"
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, _half_then(KeyboardInterrupt()))
    assert os.listdir(tmp_path) == []


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="folder .* does not exist"):
        write_atomic(tmp_path / "nope" / "out.pt", lambda fh: fh.write(b"x"))


def test_target_is_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="it is a directory"):
        write_atomic(tmp_path / "d", lambda fh: fh.write(b"x"))
    assert os.listdir(tmp_path) == ["d"]


def test_normalize_output_untouched_when_torch_save_fails(cli, tmp_path, monkeypatch):
    """Through the CLI: torch.save dies half-way; the previous output stays, exit code 4, no temporary file."""
    import torch
    from conftest import SAMPLES

    out = tmp_path / "out.pt"
    out.write_bytes(OLD)
    real_save = torch.save

    def dying_save(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise RuntimeError("simulated crash inside torch.save")

    monkeypatch.setattr(torch, "save", dying_save)
    result = cli("normalize", SAMPLES / "input.pt", "--output", out)
    monkeypatch.setattr(torch, "save", real_save)
    assert result.exit_code == 4, result
    assert result.stderr.startswith("error: internal error: RuntimeError: simulated crash inside torch.save")
    assert out.read_bytes() == OLD
    assert os.listdir(tmp_path) == ["out.pt"]
