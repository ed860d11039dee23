"""What sniffing says about a file it cannot read: judged by its bytes (not its reported size), binary never called
text, and a read error one `error:` line with exit code 3."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from bncli.errors import InputError
from bncli.loading import sniff


def _refusal(path: Path) -> str:
    with pytest.raises(InputError) as info:
        sniff(path)
    return info.value.message


@pytest.mark.parametrize(
    "data,looks_like",
    [
        (b"\0" * 8, "unknown binary data"),
        (b"weights\0\0\0\x01\x02", "unknown binary data"),
        (b"\x1b[31mred\x1b[0m", "unknown binary data"),  # terminal escapes: control characters, not text
        (b"epoch 3, loss 0.12\n", "text"),
        ("caf\u00e9 ".encode() * 102 + "\u00e9".encode()[:1], "text"),  # a character cut at the 512-byte sample's end
        (b'{"lr": 0.1}', "JSON text"),
        (b"", "empty file"),
    ],
    ids=["nul-bytes", "nul-inside", "escapes", "text", "cut-utf8", "json", "empty"],
)
def test_first_bytes_described_by_content(tmp_path, data, looks_like):
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    assert _refusal(path) == f"{path}: not a checkpoint bncli can read (looks like: {looks_like})"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("name,looks_like", [("status", "text"), ("cmdline", "unknown binary data")])
def test_files_that_report_size_zero_are_judged_by_their_bytes(name, looks_like):
    path = Path("/proc/self") / name
    assert path.stat().st_size == 0 and path.read_bytes()  # what makes them odd: no size, yet content
    assert _refusal(path) == f"{path}: not a checkpoint bncli can read (looks like: {looks_like})"


def test_a_checkpoint_that_reports_size_zero_is_refused_plainly(tmp_path, monkeypatch):
    """A special file whose bytes start like a checkpoint: every reader relies on the size, so say what it is."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2) + b"{}")
    real_stat = Path.stat

    class ZeroSize:
        def __init__(self, st):
            self._st = st

        def __getattr__(self, name):
            return 0 if name == "st_size" else getattr(self._st, name)

    monkeypatch.setattr(Path, "stat", lambda self, **kw: ZeroSize(real_stat(self, **kw)) if self == path else real_stat(self, **kw))
    assert _refusal(path) == (
        f"{path}: reports a size of 0 bytes but holds data (a special file, such as those under /proc); "
        "copy it to a regular file first"
    )


class _FailingFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, *args):
        raise OSError(errno.EIO, "Input/output error")


def test_eio_while_reading_the_first_bytes_is_one_error_line_exit_3(tmp_path, monkeypatch, cli):
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: _FailingFile() if self == path else real_open(self, *a, **k))
    result = cli("inspect", path)
    assert result.exit_code == 3
    assert result.stderr == f"error: {path}: cannot read: Input/output error\n"
    assert "(1 unreadable)" in result.stdout


def test_a_zip_archive_with_data_before_it_is_named(tmp_path):
    """torch.save's bytes after a prefix (a shell stub, a second file): say so, with or without relocated offsets."""
    import io

    import torch
    from badfiles import relocate

    buf = io.BytesIO()
    torch.save({"bn.running_var": torch.ones(3)}, buf)
    for name, data in [("prefixed", b"#!/bin/sh\n" * 10 + buf.getvalue()), ("relocated", b"\0" * 100 + relocate(buf.getvalue(), 100))]:
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        assert _refusal(path) == (
            f"{path}: not a checkpoint bncli can read (looks like: zip archive with 100 bytes of other data before it, "
            "which torch.load cannot read either)"
        )
