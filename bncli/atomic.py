"""Write files atomically: a temporary file in the same folder, flushed, fsynced, then os.replace."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from bncli.errors import InputError


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call write(fh) on a temporary file, then move it over `path`; on any failure `path` is untouched."""
    path = Path(path)
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except FileNotFoundError:
        raise InputError(f"{path}: cannot write: folder {folder} does not exist") from None
    except PermissionError:
        raise InputError(f"{path}: cannot write: permission denied in {folder}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:  # KeyboardInterrupt too: the temporary file must not outlive the write
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, IsADirectoryError):
            raise InputError(f"{path}: cannot write: it is a directory") from None
        if isinstance(exc, OSError) and not isinstance(exc, InterruptedError):
            raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; some systems cannot open a folder for this, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read from /proc where Linux shows it: setting and restoring it (the only portable way
    to read it) would briefly change it for every other thread."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
