"""torch.save's legacy format (before torch 1.6, or `_use_new_zipfile_serialization=False`), read without torch.

The file is a run of pickles (magic number, protocol version, system info, the object, the list of storage keys)
followed by each storage's bytes: an int64 element count, then the elements, little-endian, in the order of the
key list. torch reads it whole into memory; bncli reads only the tensors asked for.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from bncli.budget import Budget, human
from bncli.console import show
from bncli.errors import InputError
from bncli.formats.pickle_vm import Machine, PickleError
from bncli.formats.tensors import LazyStorage, itemsize
from bncli.formats.torch_zip import storage_type

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def _brief(value: Any) -> str:
    """A value from the file, described without converting a huge integer to text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if value.bit_length() < 64 else f"an integer of {value.bit_length()} bits"
    return f"a {type(value).__name__}"


def _tar_header(path: Path) -> bool:
    """Whether the file starts with a valid tar header: torch tries its pre-2017 tar format first, so a file that
    is both a tar archive and a legacy pickle stream would be read as the tar by torch.load(weights_only=False)."""
    import tarfile

    with path.open("rb") as fh:
        head = fh.read(512)
    if len(head) < 512:
        return False
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.TarError:
        return False
    return True


class _Ref:
    """A storage (or a legacy view of one) by its key: its file offset is known once the key list is read."""

    __slots__ = ("key", "byte_offset")

    def __init__(self, key: str, byte_offset: int = 0) -> None:
        self.key, self.byte_offset = key, byte_offset


class LegacySource:
    def __init__(self, path: Path, budget: Budget) -> None:
        self.path, self.budget, self.where = path, budget, show(path)
        self.byteorder = "<"  # torch writes legacy storages little-endian on every machine
        self.offsets: dict[str, int] = {}  # storage key -> absolute offset of its first element

    def read_storage(self, ref: _Ref, start: int, length: int, whole: int) -> bytes:
        offset = self.offsets[ref.key] + ref.byte_offset + start
        with self.path.open("rb", buffering=0) as fh:
            data = os.pread(fh.fileno(), length, offset)
        if len(data) != length:
            raise InputError(f"{self.where}: truncated: storage {ref.key!r} ends past the end of the file")
        return data


def load(path: Path, budget: Budget) -> tuple[Any, Machine]:
    source = LegacySource(path, budget)
    p = source.where
    if _tar_header(path):
        raise InputError(
            f"{p}: both a tar archive and a legacy torch pickle: torch.load would read the tar (torch's pre-2017 "
            "format) and bncli the pickle, so no audit of it could be trusted; refused"
        )
    size = path.stat().st_size
    roots: dict[str, LazyStorage] = {}
    views: dict[str, LazyStorage] = {}

    def persistent_load(pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 4 and pid[0] in ("module", b"module"):
            # a whole model's class, saved with its source code for torch's "source changed" warning: the class
            # (a record) is what torch returns; the source text is ignored, as torch only compares it
            return pid[1]
        if not (type(pid) is tuple and len(pid) == 6 and pid[0] in ("storage", b"storage")):
            raise PickleError("a persistent id that is not a storage")
        _, kind, key, _location, numel, view = pid
        if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise PickleError("a malformed storage id")
        if numel >= 1 << 62:
            raise PickleError(f"storage {key[:40]} declares {numel.bit_length()}-bit many elements")
        typed = storage_type(kind)
        if typed is None:
            raise PickleError("an untyped storage in a legacy file")
        nbytes = numel * itemsize(typed[0])
        # torch keeps root storages and views in one table: a key naming both would make torch read another
        # storage than the pickle says, so a key used for both is refused
        if key in views:
            raise PickleError(f"storage key {key} names both a storage and a view")
        root = roots.get(key)
        if root is None:
            root = roots[key] = LazyStorage(source, _Ref(key), nbytes, typed)
        elif root.nbytes != nbytes or root.typed != typed:
            raise PickleError(f"storage {key} is declared twice, with different types or sizes")
        if view is None:
            return root
        if not (type(view) is tuple and len(view) == 3):
            raise PickleError("a malformed storage view")
        view_key, offset, view_size = view
        if not (isinstance(view_key, str) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, view_size))):
            raise PickleError("a malformed storage view")
        if view_key in roots:
            raise PickleError(f"storage key {view_key} names both a storage and a view")
        item = itemsize(typed[0])
        if (offset + view_size) * item > nbytes:
            raise PickleError(f"storage view {view_key} reaches past the end of storage {key}")
        known = views.get(view_key)
        if known is None:
            views[view_key] = LazyStorage(source, _Ref(key, offset * item), view_size * item, typed)
        elif known.ref.key != key or known.ref.byte_offset != offset * item or known.nbytes != view_size * item:
            raise PickleError(f"storage view {view_key} is declared twice, differently")
        return views[view_key]

    with path.open("rb") as fh:
        try:
            if Machine(budget).load(fh) != MAGIC:
                raise InputError(f"{p}: a Python pickle that torch.save did not write; bncli reads only torch checkpoints")
            version = Machine(budget).load(fh)
            if version != PROTOCOL_VERSION:
                raise InputError(f"{p}: a legacy torch file of protocol {_brief(version)}; torch reads only {PROTOCOL_VERSION}")
            info = Machine(budget).load(fh)  # system info: legacy storages are little-endian whatever it says
            if type(info) is not dict:
                raise InputError(f"{p}: corrupt legacy torch file: its system information is not a small dictionary")
            machine = Machine(budget, persistent_load)
            obj = machine.load(fh)
            keys = Machine(budget).load(fh)
        except PickleError as exc:
            raise InputError(f"{p}: corrupt or unsupported legacy torch pickle: {exc}") from None
        if type(keys) is not list or not all(isinstance(k, str) for k in keys):
            raise InputError(f"{p}: corrupt legacy torch file: no storage list after the pickle")
        pos = fh.tell()
    with path.open("rb", buffering=0) as raw:
        for key in keys:
            storage = roots.get(key)
            if key in views:
                raise InputError(f"{p}: corrupt legacy torch file: the storage list names view {key!r}")
            if storage is None:
                raise InputError(f"{p}: corrupt legacy torch file: storage {key!r} is stored but never used")
            if key in source.offsets:
                raise InputError(f"{p}: corrupt legacy torch file: storage {key!r} is stored twice")
            head = os.pread(raw.fileno(), 8, pos)
            if len(head) < 8:
                raise InputError(f"{p}: truncated: storage {key!r} is missing (the file ends at {human(size)})")
            (count,) = struct.unpack("<q", head)
            item = itemsize(storage.typed[0])
            if count < 0 or count * item != storage.nbytes:
                raise InputError(
                    f"{p}: corrupt legacy torch file: storage {key!r} holds {count} elements, "
                    f"but the pickle declares {storage.nbytes // item}"
                )
            source.offsets[key] = pos + 8
            pos += 8 + storage.nbytes
            if pos > size:
                raise InputError(f"{p}: truncated: storage {key!r} needs {human(storage.nbytes)} beyond the end of the file")
    missing = [k for k in roots if k not in source.offsets]
    if missing:
        raise InputError(f"{p}: corrupt legacy torch file: storage {missing[0]!r} is used but never stored")
    return obj, machine
