"""Check a file's structure before torch or safetensors touch it: zip records, legacy storages, safetensors headers."""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bncli.budget import MAX_HEADER_BYTES as MAX_SAFETENSORS_HEADER
from bncli.budget import human, max_load_bytes  # noqa: F401 - re-exported for the readers
from bncli.errors import InputError, first_line
from bncli.formats.zipdir import TorchZip, ZipRecord, read_zip_directory  # noqa: F401 - re-exported

# safetensors dtype codes -> (the name torch uses, bytes per element); bncli reports the torch name.
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
}


def show(path: str | os.PathLike) -> str:
    """The path as printable text: bytes that are not UTF-8 appear as \\xNN instead of breaking the terminal."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- torch zip archives


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


# --------------------------------------------------------------------------- pickled storages


@dataclass(frozen=True)
class Storage:
    key: str
    dtype: str
    nbytes: int


def declared_storages(fh) -> dict[str, Storage]:
    """Unpickle a torch pickle with torch's weights-only unpickler, storages on the meta device (no data, no memory).

    Returns every storage the pickle refers to, so that their sizes can be checked against the file before torch
    allocates them (legacy files are read whole). Raises pickle.UnpicklingError for anything weights_only refuses.
    """
    import torch
    from torch import _utils
    from torch import _weights_only_unpickler as wo

    found: dict[str, Storage] = {}

    def persistent_load(saved_id):
        if not isinstance(saved_id, tuple) or not saved_id or saved_id[0] not in ("storage", b"storage"):
            raise RuntimeError(f"unexpected persistent id {str(saved_id)[:80]}")
        storage_type, key, _location, numel = saved_id[1:5]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if not isinstance(numel, int) or numel < 0:
            raise RuntimeError(f"storage {key} declares {numel!r} elements")
        nbytes = numel * _utils._element_size(dtype)
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        if key in found and found[key].nbytes != nbytes:
            raise RuntimeError(f"storage {key} is declared with two sizes")
        found[key] = Storage(key, str(dtype).removeprefix("torch."), nbytes)
        meta = torch.UntypedStorage(nbytes, device="meta")
        return torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)

    pending = len(_utils._sparse_tensors_to_validate)
    unpickler = wo.Unpickler(fh, encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        unpickler.load()
    finally:
        # Sparse tensors queue themselves for validation by the next torch.load; these meta ones must not.
        del _utils._sparse_tensors_to_validate[pending:]
    return found


class Unverifiable(Exception):
    """A loaded tensor whose storage cannot be traced to a record (sparse, quantized...): load it unmapped instead."""


def check_mapped_storages(obj: Any, path: Path, archive: TorchZip) -> None:
    """After torch.load(mmap=True): every tensor's storage must be exactly one record, at its offset and of its size.

    torch takes each mapped storage's length from the pickle without comparing it with the record, so a pickle that
    declares more would read the bytes of other records (or past them). Checked here, before any value is read:
    cheap (no second unpickling), and a mismatch is an error. Raises Unverifiable for tensors it cannot trace.
    """
    import torch

    storages: dict[int, set[int]] = {}  # data pointer -> declared lengths
    seen: set[int] = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided or x.is_quantized or x.device.type != "cpu":
                raise Unverifiable(type(x).__name__)
            storage = x.untyped_storage()
            if storage.nbytes():
                storages.setdefault(storage.data_ptr(), set()).add(storage.nbytes())
        elif isinstance(x, (dict, list, tuple, set, frozenset)) and id(x) not in seen:
            seen.add(id(x))  # pickles can build cycles
            stack.extend(x.values() if isinstance(x, dict) else x)
    if not storages:
        return
    by_offset = {r.data_offset: r for name, r in archive.records.items() if name.startswith("data/") and r.size}
    if not by_offset:
        raise InputError(f"{show(path)}: corrupt torch archive: tensors but no data records")
    base = min(storages) - min(by_offset)  # the mapping's address: the first storage is the first record
    for ptr in sorted(storages):
        record = by_offset.get(ptr - base)
        for nbytes in storages[ptr]:
            if record is None:
                raise InputError(f"{show(path)}: corrupt torch archive: a tensor's storage does not start at any record")
            if nbytes != record.size:
                raise InputError(
                    f"{show(path)}: corrupt torch archive: the pickle declares {human(nbytes)} for record "
                    f"{record.name!r}, which holds {human(record.size)}"
                )


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def check_torch_legacy(path: Path) -> None:
    """Walk a legacy (pre-1.6) torch file: magic number, pickles, then each storage's size and bytes, without loading data.

    The declared storages must add up to the bytes that follow the pickles and fit the in-memory cap, since
    torch reads legacy files entirely into memory.
    """
    from torch import _weights_only_unpickler as wo

    p = show(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        if wo.load(fh, encoding="utf-8") != LEGACY_MAGIC:
            raise InputError(f"{p}: a Python pickle that torch.save did not write; bncli reads only torch checkpoints")
        wo.load(fh, encoding="utf-8")  # protocol version
        wo.load(fh, encoding="utf-8")  # sys info
        storages = declared_storages(fh)
        keys = wo.load(fh, encoding="utf-8")
        if not isinstance(keys, list):
            raise InputError(f"{p}: corrupt legacy torch file: no storage list after the pickle")
        total = sum(s.nbytes for s in storages.values())
        cap = max_load_bytes()
        if total > cap:
            raise InputError(f"{p}: declares {human(total)} of tensors, above the {human(cap)} limit (BNCLI_MAX_LOAD_BYTES)")
        pos = fh.tell()
        for key in keys:
            s = storages.get(str(key))
            if s is None:
                raise InputError(f"{p}: corrupt legacy torch file: storage {key!r} is listed but never used")
            fh.seek(pos)
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{p}: truncated: storage {key!r} is missing (file ends at {human(size)})")
            (count,) = struct.unpack("<q", head)
            width = _element_size(s.dtype)
            if count < 0 or count * width != s.nbytes:
                raise InputError(f"{p}: corrupt legacy torch file: storage {key!r} declares two different sizes")
            pos += 8 + s.nbytes
            if pos > size:
                raise InputError(f"{p}: truncated: storage {key!r} needs {human(s.nbytes)} beyond the end of the file")


def _element_size(dtype: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


# --------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int


def check_safetensors(path: Path) -> dict[str, SafetensorsEntry]:
    """Parse and check a safetensors header before safe_open sees it; entries in file order.

    Checks what the format requires (length, UTF-8 JSON object, no duplicate keys, known dtypes, sizes that match
    shapes, offsets contiguous, without overlap and inside the file) so every failure gets a plain message.
    """
    p = show(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InputError(f"{p}: corrupt safetensors file: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER:
            raise InputError(f"{p}: corrupt safetensors file: its header claims {n} bytes (the format allows 100 MB)")
        if 8 + n > size:
            raise InputError(f"{p}: corrupt safetensors file: its header claims {n} bytes but the file has {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        raise InputError(f"{p}: corrupt safetensors file: the key {exc.key!r} appears twice in the header") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{p}: corrupt safetensors file: its header is not valid JSON ({first_line(exc)})") from None
    if not isinstance(header, dict):
        raise InputError(f"{p}: corrupt safetensors file: its header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{p}: corrupt safetensors file: __metadata__ must map strings to strings")
    data_start = 8 + n
    entries = {}
    for name, info in header.items():
        entries[name] = _entry(p, name, info, data_start)
    ordered = sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end))
    expected = data_start
    for name, e in ordered:
        if e.start < expected:
            raise InputError(f"{p}: corrupt safetensors file: tensor {name!r} overlaps the tensor before it")
        if e.start > expected:
            raise InputError(f"{p}: corrupt safetensors file: a gap of {e.start - expected} bytes before tensor {name!r}")
        expected = e.end
    if expected > size:
        name = ordered[-1][0]
        raise InputError(f"{p}: truncated safetensors file: tensor {name!r} ends at byte {expected} but the file has {size}")
    if expected < size:
        raise InputError(f"{p}: corrupt safetensors file: {size - expected} bytes after the last tensor")
    return dict(ordered)


def _entry(p: str, name: str, info: Any, data_start: int) -> SafetensorsEntry:
    if not isinstance(info, dict):
        raise InputError(f"{p}: corrupt safetensors file: the header entry for {name!r} is not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code not in SAFETENSORS_DTYPES:
        raise InputError(f"{p}: tensor {name!r} has unknown dtype {code!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise InputError(f"{p}: corrupt safetensors file: tensor {name!r} has shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets) or offsets[0] > offsets[1]:
        raise InputError(f"{p}: corrupt safetensors file: tensor {name!r} has data_offsets {offsets!r}")
    count = 1
    for d in shape:
        count *= d
    nbytes = count * SAFETENSORS_DTYPES[code][1]
    if offsets[1] - offsets[0] != nbytes:
        raise InputError(
            f"{p}: corrupt safetensors file: tensor {name!r} of shape {tuple(shape)} and dtype {code} needs {nbytes} bytes "
            f"but its offsets span {offsets[1] - offsets[0]}"
        )
    return SafetensorsEntry(code, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


