"""torch.save's zip format (torch 1.6 and later), read without torch: the archive as torch reads it, the pickle
on bncli's restricted machine, and only the bytes of the tensors asked for (each record's CRC checked when read whole)."""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import Any

from bncli.budget import Budget, human, max_load_bytes
from bncli.console import show
from bncli.errors import InputError
from bncli.formats.pickle_vm import Global, Machine, PickleError
from bncli.formats.tensors import STORAGE_DTYPES, LazyStorage, itemsize
from bncli.formats.zipdir import TorchZip, ZipRecord, read_zip_directory

# torch's reader accepts archive versions 1..10 (caffe2/serialize/inline_container.cc), parsed as a leading integer.
MIN_VERSION, MAX_VERSION = 1, 10


def check_torch_zip(path: Path, *, verify_crc: bool = True) -> TorchZip:
    """Check a torch zip archive without inflating or mapping anything; raise InputError on the first problem.

    The directory is read with torch's rules (bncli/formats/zipdir.py): every record stored uncompressed, as torch
    writes them, at the data offset torch's own reader reports, inside the file, without overlap, prefix, gap or a
    local header that disagrees, so that bncli and torch.load see the same archive; with verify_crc, every record
    must also match its CRC-32, so that a mapped tensor can never read damaged bytes. The pickle (data.pkl) must fit
    the in-memory cap.
    """
    archive = read_zip_directory(path)
    p = show(path)
    pkl = archive.records.get("data.pkl")
    if pkl is None:
        raise InputError(f"{p}: not a checkpoint bncli can read (looks like: zip archive without data.pkl)")
    cap = max_load_bytes()
    if pkl.size > cap:
        raise InputError(f"{p}: its pickle (data.pkl) is {human(pkl.size)}, above the {human(cap)} limit (BNCLI_MAX_LOAD_BYTES)")
    if verify_crc:
        with path.open("rb") as fh:
            for record in archive.records.values():
                verify_record_crc(path, record, fh)
    return archive


def verify_record_crc(path: Path, record: ZipRecord, fh=None) -> None:
    """Read one record and compare its CRC-32 with the archive's: catches flipped bits in tensor data."""
    if fh is None:
        with path.open("rb") as own:
            verify_record_crc(path, record, own)
        return
    crc = 0
    left = record.size
    fh.seek(record.data_offset)
    while left:
        chunk = fh.read(min(left, 1 << 24))
        if not chunk:
            raise InputError(f"{show(path)}: truncated: record {record.name!r} ends past the end of the file")
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    if crc != record.crc:
        raise crc_error(path, record)


def crc_error(path: Path, record: ZipRecord) -> InputError:
    return InputError(f"{show(path)}: corrupt: record {record.name!r} fails its CRC-32 check (the file is damaged)")


def read_record(path: Path, record: ZipRecord) -> bytes:
    """The bytes of one checked record, for readers that bypass torch.load."""
    with path.open("rb") as fh:
        fh.seek(record.data_offset)
        return fh.read(record.size)


class ZipSource:
    """The checked archive, where storages read their bytes from."""

    def __init__(self, path: Path, budget: Budget) -> None:
        self.path = path
        self.budget = budget
        self.where = show(path)
        self.zip = check_torch_zip(path, verify_crc=False)
        version = self._version()
        if not MIN_VERSION <= version <= MAX_VERSION:
            raise InputError(f"{self.where}: a torch archive of version {version}; torch reads versions {MIN_VERSION} to {MAX_VERSION}")
        order = self.read_whole("byteorder").decode("ascii", "replace") if "byteorder" in self.zip.records else "little"
        if order not in ("little", "big"):
            raise InputError(f"{self.where}: corrupt torch archive: its byteorder record says {order[:20]!r}")
        self.byteorder = "<" if order == "little" else ">"

    def _version(self) -> int:
        name = ".data/version" if ".data/version" in self.zip.records else "version"
        if name not in self.zip.records:
            raise InputError(f"{self.where}: corrupt torch archive: it has no version record, which torch requires")
        text = self.read_whole(name).decode("ascii", "replace")
        match = re.match(r"\s*(\d{1,9})", text)
        if match is None:
            raise InputError(f"{self.where}: corrupt torch archive: its version record says {text[:20]!r}")
        return int(match.group(1))

    def read_whole(self, name: str) -> bytes:
        record = self.zip.records[name]
        self.budget.charge(record.size, f"record {record.name!r}")
        with self.path.open("rb", buffering=0) as fh:  # the pickle and small records, not tensor storages
            data = os.pread(fh.fileno(), record.size, record.data_offset)
        if len(data) != record.size:
            raise InputError(f"{self.where}: truncated: record {record.name!r} ends past the end of the file")
        if zlib.crc32(data) != record.crc:
            raise crc_error(self.path, record)
        return data

    def read_storage(self, record: ZipRecord, start: int, length: int, whole: int) -> bytes:
        if start + length > record.size:
            raise InputError(f"{self.where}: corrupt: record {record.name!r} holds {record.size} bytes, fewer than its tensor needs")
        data = _read_at(self.path, record.data_offset + start, length)
        if len(data) != length:
            raise InputError(f"{self.where}: truncated: record {record.name!r} ends past the end of the file")
        if start == 0 and length == record.size and zlib.crc32(data) != record.crc:
            raise crc_error(self.path, record)
        return data

    def persistent_load(self, storages: dict[str, LazyStorage]):
        def load(pid: Any) -> LazyStorage:
            if not (type(pid) is tuple and len(pid) == 5 and pid[0] in ("storage", b"storage")):
                raise PickleError("a persistent id that is not a storage")
            _, kind, key, _location, numel = pid
            if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
                raise PickleError("a malformed storage id")
            if numel >= 1 << 62:
                raise PickleError(f"storage {key[:40]} declares {numel.bit_length()}-bit many elements")
            typed = storage_type(kind)
            nbytes = numel * (itemsize(typed[0]) if typed else 1)
            known = storages.get(key)
            if known is not None:  # views of one storage share it, as in torch
                if known.nbytes != nbytes or known.typed != typed:
                    raise PickleError(f"storage {key} is declared twice, with different types or sizes")
                return known
            record = self.zip.storage(key)
            if record is None:
                raise InputError(f"{self.where}: corrupt torch archive: the pickle uses storage {key!r}, which has no record data/{key}")
            if record.size != nbytes:
                raise InputError(
                    f"{self.where}: corrupt torch archive: the pickle declares {human(nbytes)} for record "
                    f"{record.name!r}, which holds {human(record.size)}"
                )
            storages[key] = LazyStorage(self, record, nbytes, typed)
            return storages[key]

        return load


def storage_type(kind: Any) -> tuple[str, str] | None:
    """(numpy type, dtype) of a typed storage class; None for torch.UntypedStorage."""
    if isinstance(kind, Global):
        if kind.module == "torch" and kind.name in STORAGE_DTYPES:
            return STORAGE_DTYPES[kind.name]
        if kind.path in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
            return None
    what = kind.path if isinstance(kind, Global) else type(kind).__name__
    raise PickleError(f"a storage of type {what}, which bncli does not read")


def _read_at(path: Path, offset: int, length: int) -> bytes:
    """The one place storage bytes are read from disk (tests count the bytes that pass through here)."""
    with path.open("rb", buffering=0) as fh:
        return os.pread(fh.fileno(), length, offset)


def load(path: Path, budget: Budget) -> tuple[Any, Machine]:
    """The object torch.load would return, as data: LazyTensor for tensors, records for everything else."""
    source = ZipSource(path, budget)
    data = source.read_whole("data.pkl")
    machine = Machine(budget, source.persistent_load({}))
    try:
        return machine.load(data), machine
    except PickleError as exc:
        raise InputError(f"{source.where}: corrupt or unsupported pickle in data.pkl: {exc}") from None
