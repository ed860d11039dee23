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


# --------------------------------------------------------------------------- unnamed temporary files, signals, modes

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from conftest import ROOT  # noqa: E402

from bncli import atomic  # noqa: E402
from bncli.errors import Terminated  # noqa: E402

HAS_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


@pytest.fixture(params=["unnamed", "hidden"])
def either_way(request, monkeypatch):
    """Run a test with O_TMPFILE (where the system has it) and with the hidden named temporary file."""
    if request.param == "unnamed" and not HAS_TMPFILE:
        pytest.skip("no O_TMPFILE here")
    if request.param == "hidden":
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    return request.param


def test_replacing_keeps_the_permission_bits(target, either_way):
    os.chmod(target, 0o600)
    write_atomic(target, lambda fh: fh.write(b"new"))
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    os.chmod(target, 0o640)
    write_atomic(target, lambda fh: fh.write(b"newer"))
    assert target.stat().st_mode & 0o777 == 0o640
    assert os.listdir(target.parent) == ["out.pt"]


def test_a_new_file_gets_the_umask_mode(tmp_path, either_way):
    write_atomic(tmp_path / "fresh.pt", lambda fh: fh.write(b"x"))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "fresh.pt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert os.listdir(tmp_path) == ["fresh.pt"]


@pytest.mark.skipif(not HAS_TMPFILE, reason="no O_TMPFILE here")
def test_the_temporary_file_has_no_name_while_written(target):
    seen = []

    def write(fh):
        fh.write(b"x" * 1000)
        fh.flush()
        seen.append(sorted(os.listdir(target.parent)))

    write_atomic(target, write)
    assert seen == [["out.pt"]]  # nothing visible during the write: no kill can leave it behind
    assert target.read_bytes() == b"x" * 1000


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_that_torch_turns_into_runtimeerror_is_still_an_interrupt(target, either_way, signum, expected):
    def write(fh):  # what torch.save does with an exception raised inside its writer callback
        fh.write(b"x" * 10_000)
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)
        except BaseException as exc:
            raise RuntimeError(f"[enforce fail at inline_container.cc] {type(exc).__name__}") from None

    with pytest.raises(expected):
        write_atomic(target, write)
    assert target.read_bytes() == OLD
    assert os.listdir(target.parent) == ["out.pt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_a_name_too_long_for_the_file_system_is_one_input_error(tmp_path, either_way):
    with pytest.raises(InputError, match="the file name is 300 bytes long"):
        write_atomic(tmp_path / ("a" * 300), lambda fh: fh.write(b"x"))
    name = "b" * 250  # fits, but a temporary name built from it would not
    write_atomic(tmp_path / name, lambda fh: fh.write(b"x"))
    assert os.listdir(tmp_path) == [name]


def test_a_parent_that_is_a_file_is_one_input_error(tmp_path, either_way):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InputError, match="is a file, not a folder"):
        write_atomic(tmp_path / "file" / "out.pt", lambda fh: fh.write(b"x"))


def test_temporary_name_helper_cuts_on_a_character_boundary():
    cut = atomic._shortened("é" * 200, 101)
    assert len(os.fsencode(cut)) <= 101 and set(cut) == {"é"}


SLOW_SAVE = """
import os, sys, time
import torch
def slow_save(obj, f, *args, **kwargs):
    f.write(b"x" * 1_000_000)
    f.flush()
    print("writing", file=sys.stderr, flush=True)
    time.sleep(60)
torch.save = slow_save
sys.argv = ["bncli", "normalize", sys.argv[1], "--output", sys.argv[2]]
from bncli.cli import main
main()
"""


def _start_slow_write(tmp_path, out):
    import torch

    torch.save(torch.randn(2, 3, 4, 4), tmp_path / "in.pt")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(tmp_path / "in.pt"), str(out)], cwd=tmp_path,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr.readline().strip() == "writing"
    return proc


@pytest.mark.parametrize("kill", ["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_mid_write_leave_nothing_behind(tmp_path, kill):
    out = tmp_path / "out" / "result.pt"
    out.parent.mkdir()
    out.write_bytes(OLD)
    proc = _start_slow_write(tmp_path, out)
    proc.send_signal(getattr(signal, kill))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if kill == "SIGTERM" else 130)
    assert err.strip() == ("error: terminated (SIGTERM)" if kill == "SIGTERM" else "error: interrupted")
    assert os.listdir(out.parent) == ["result.pt"] and out.read_bytes() == OLD


@pytest.mark.skipif(not HAS_TMPFILE, reason="without O_TMPFILE a SIGKILL leaves the hidden temporary file")
def test_sigkill_mid_write_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out" / "result.pt"
    out.parent.mkdir()
    out.write_bytes(OLD)
    proc = _start_slow_write(tmp_path, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(out.parent) == ["result.pt"] and out.read_bytes() == OLD
