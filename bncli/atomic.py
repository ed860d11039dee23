"""Write files atomically: an unnamed (or hidden) temporary file in the same folder, fsynced, then put in place.

On Linux the temporary file has no name at all (O_TMPFILE): it is linked into the folder only once complete,
so that no kill, not even SIGKILL, leaves anything visible. Elsewhere, or where the file system has no
O_TMPFILE, it is a hidden `.NAME.XXXXXX.tmp` next to the output, removed on any failure. SIGTERM is handled as
Ctrl-C is while a file is written (the temporary file is removed, then exit 143; Ctrl-C exits 130), also when
it lands inside torch.save, which turns the interrupt into a RuntimeError. Replacing an existing file keeps
its permission bits.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import stat
import threading
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from bncli.errors import InputError, Terminated

NAME_MAX = 255  # bytes in one path component on every file system bncli writes to


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call write(fh) on a temporary file, then move it over `path`; on any failure `path` is untouched."""
    path = Path(path)
    folder = path.parent
    mode = _mode_for(path)
    with _signals_as_interrupts() as received:
        fd, tmp = _open_temporary(path, folder, mode)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
                if tmp is None:
                    _link_unnamed(fh.fileno(), path)
            if tmp is not None:
                os.chmod(tmp, mode)  # mkstemp makes 0600
                os.replace(tmp, path)
        except BaseException as exc:  # KeyboardInterrupt too: the temporary file must not outlive the write
            if tmp is not None:
                with suppress(FileNotFoundError):
                    os.unlink(tmp)
            if received:  # a signal, whatever exception it became on the way (torch.save: a RuntimeError)
                raise received[0]() from None
            if isinstance(exc, IsADirectoryError):
                raise InputError(f"{path}: cannot write: it is a directory") from None
            if isinstance(exc, OSError) and not isinstance(exc, InterruptedError):
                raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None
            raise
    _fsync_folder(folder)


def _mode_for(path: Path) -> int:
    """The permission bits the result gets: an existing file's own (a 0600 result stays 0600), else what
    open() would give a new file."""
    try:
        st = os.stat(path)
    except OSError:
        return 0o666 & ~_umask()
    return stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else 0o666 & ~_umask()


def _open_temporary(path: Path, folder: Path, mode: int) -> tuple[int, str | None]:
    """(fd, None) for an unnamed O_TMPFILE file, or (fd, name) for a hidden named one."""
    _check_folder(path, folder)
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), mode)
        except OSError as exc:
            # EOPNOTSUPP/EISDIR/EINVAL: this file system or kernel has no O_TMPFILE; anything else, say it
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise _cannot_write(path, folder, exc) from None
        else:
            os.fchmod(fd, mode)  # the mode given to open() went through the umask; an existing file's does not
            return fd, None
    import tempfile

    prefix = "." + _shortened(path.name, NAME_MAX - len(".") - len(".XXXXXXXX.tmp") - 8) + "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _cannot_write(path, folder, exc) from None
    return fd, tmp


def _check_folder(path: Path, folder: Path) -> None:
    """The mistakes one line can name before any byte is written: a name too long, a folder that is not one."""
    name = os.fsencode(path.name)
    if len(name) > NAME_MAX:
        raise InputError(f"{path}: cannot write: the file name is {len(name)} bytes long, more than the {NAME_MAX} "
                         "a file system allows")
    if not folder.exists():
        raise InputError(f"{path}: cannot write: folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"{path}: cannot write: {folder} is a file, not a folder")
    if path.is_dir():
        raise InputError(f"{path}: cannot write: it is a directory")


def _cannot_write(path: Path, folder: Path, exc: OSError) -> InputError:
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{path}: cannot write: folder {folder} does not exist")
    if isinstance(exc, PermissionError):
        return InputError(f"{path}: cannot write: permission denied in {folder}")
    if isinstance(exc, NotADirectoryError):
        return InputError(f"{path}: cannot write: {folder} is a file, not a folder")
    return InputError(f"{path}: cannot write: {exc.strerror or exc}")


def _shortened(name: str, limit: int) -> str:
    """`name` cut to at most `limit` bytes (on a character boundary): the temporary name only has to be unique."""
    encoded = os.fsencode(name)
    if len(encoded) <= limit:
        return name
    return os.fsdecode(encoded[:limit]).encode("utf-8", "surrogateescape")[:limit].decode("utf-8", "ignore")


def _link_unnamed(fd: int, path: Path) -> None:
    """Give the complete unnamed file its name: linkat through /proc/self/fd (no privilege needed), directly when
    `path` does not exist, else under a hidden name and renamed over it (rename is the atomic replacement)."""
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            os.link(str(fd), path, src_dir_fd=proc, follow_symlinks=True)
            return
        except FileExistsError:
            pass
        for _ in range(100):
            hidden = path.parent / f".{_shortened(path.name, NAME_MAX - 20)}.{secrets.token_hex(4)}.tmp"
            try:
                os.link(str(fd), hidden, src_dir_fd=proc, follow_symlinks=True)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))
        try:
            os.replace(hidden, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(hidden)
            raise
    finally:
        os.close(proc)


@contextmanager
def _signals_as_interrupts():
    """While a file is written, SIGINT and SIGTERM raise KeyboardInterrupt / Terminated (so that the temporary
    file is removed) and are remembered: torch.save turns an exception raised inside it into a RuntimeError,
    and the handler above must still exit as interrupted. Only the main thread can set signal handlers."""
    received: list[type[KeyboardInterrupt]] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        kind = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        received.append(kind)
        raise kind()

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        with suppress(ValueError, OSError):
            previous[signum] = signal.signal(signum, handler)
    try:
        yield received
    finally:
        for signum, old in previous.items():
            with suppress(ValueError, OSError):
                signal.signal(signum, old)


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
