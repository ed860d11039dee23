"""safetensors, read without the library: the header parsed and checked as the safetensors library does, then
plain reads at the checked offsets (only the tensors asked for)."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from json.decoder import scanstring
from pathlib import Path
from typing import Any

from bncli.budget import MAX_HEADER_BYTES as MAX_SAFETENSORS_HEADER
from bncli.budget import Budget, human, max_load_bytes  # noqa: F401
from bncli.console import show
from bncli.errors import InputError, first_line

MAX_DIMS = 64  # torch's and numpy's limit on a tensor's dimensions

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
    if not raw.startswith(b"{"):  # the library refuses anything else there, even whitespace
        raise InputError(f"{p}: corrupt safetensors file: its header does not start with '{{'")
    data_start = 8 + n
    entries: dict[str, SafetensorsEntry] = {}
    try:
        # One top-level entry at a time: a header of a million entries is refused at the limit, before a million
        # objects exist (json.loads would build them all, then the checks would walk them all).
        for name, info in _header_items(raw.decode("utf-8"), p):
            if name == "__metadata__":
                continue
            entries[name] = _entry(p, name, info, data_start)
    except _Duplicate as exc:
        raise InputError(f"{p}: corrupt safetensors file: the key {_cut(exc.key)!r} appears twice in the header") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{p}: corrupt safetensors file: its header is not valid JSON ({first_line(exc)})") from None
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
    if isinstance(shape, list) and len(shape) > MAX_DIMS:
        raise InputError(f"{p}: tensor {name!r} has {len(shape):,} dimensions; torch and numpy allow {MAX_DIMS}")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise InputError(f"{p}: corrupt safetensors file: tensor {name!r} has shape {_cut(repr(shape))}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets) or offsets[0] > offsets[1]:
        raise InputError(f"{p}: corrupt safetensors file: tensor {name!r} has data_offsets {_cut(repr(offsets))}")
    count = 1
    for d in shape:
        count *= d
        if count >= 1 << 64:  # the library multiplies in 64 bits and refuses an overflow, even before a zero
            raise InputError(f"{p}: corrupt safetensors file: tensor {name!r} has shape {_cut(repr(shape))}, too large")
    nbytes = count * SAFETENSORS_DTYPES[code][1]
    if offsets[1] - offsets[0] != nbytes:
        raise InputError(
            f"{p}: corrupt safetensors file: tensor {name!r} of shape {tuple(shape)} and dtype {code} needs {nbytes} bytes "
            f"but its offsets span {offsets[1] - offsets[0]}"
        )
    return SafetensorsEntry(code, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _header_items(text: str, p: str):
    """The header's top-level (key, value) pairs, parsed one at a time; the entry count is checked as they come.

    __metadata__ is parsed the same way (its pairs are counted too) and must map strings to strings. Keys and strings
    must be valid Unicode (the safetensors library refuses lone surrogates); nothing but whitespace may follow the
    object, as for json.loads and the library.
    """
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates)
    idx = _WHITESPACE.match(text, 0).end()
    if text[idx : idx + 1] != "{":
        raise InputError(f"{p}: corrupt safetensors file: its header is not a JSON object")
    seen: set[str] = set()
    idx = _WHITESPACE.match(text, idx + 1).end()
    closed = text[idx : idx + 1] == "}"
    while not closed:
        key, idx = _key(text, idx)
        if key in seen:
            raise _Duplicate(key)
        seen.add(key)
        Budget.check_entries(p, len(seen), "its safetensors header")
        _check_unicode(p, key)
        if key == "__metadata__":
            value, idx = _metadata(text, idx, p)
        else:
            value, idx = decoder.raw_decode(text, idx)
        yield key, value
        idx, closed = _next_item(text, idx)
    if text[idx + 1 :].strip(" \t\n\r"):
        raise ValueError(f"extra data after the header's object at char {idx + 1}")


def _key(text: str, idx: int) -> tuple[str, int]:
    """A key and the index of its value (after the colon)."""
    if text[idx : idx + 1] != '"':
        raise ValueError(f"expected a key in double quotes at char {idx}")
    key, idx = scanstring(text, idx + 1)
    idx = _WHITESPACE.match(text, idx).end()
    if text[idx : idx + 1] != ":":
        raise ValueError(f"expected ':' at char {idx}")
    return key, _WHITESPACE.match(text, idx + 1).end()


def _next_item(text: str, idx: int) -> tuple[int, bool]:
    """After a value: (index of the next key, False) or (index of the closing brace, True)."""
    idx = _WHITESPACE.match(text, idx).end()
    c = text[idx : idx + 1]
    if c == "}":
        return idx, True
    if c != ",":
        raise ValueError(f"expected ',' or '}}' at char {idx}")
    return _WHITESPACE.match(text, idx + 1).end(), False


def _metadata(text: str, idx: int, p: str) -> tuple[dict[str, str], int]:
    """__metadata__: an object of strings, read pair by pair and counted against the same entry limit."""
    bad = InputError(f"{p}: corrupt safetensors file: __metadata__ must map strings to strings")
    if text[idx : idx + 1] != "{":
        raise bad
    meta: dict[str, str] = {}
    idx = _WHITESPACE.match(text, idx + 1).end()
    closed = text[idx : idx + 1] == "}"
    while not closed:
        key, idx = _key(text, idx)
        if key in meta:
            raise _Duplicate(key)
        if text[idx : idx + 1] != '"':
            raise bad
        value, idx = scanstring(text, idx + 1)
        _check_unicode(p, key)
        _check_unicode(p, value)
        meta[key] = value
        Budget.check_entries(p, len(meta), "its safetensors __metadata__")
        idx, closed = _next_item(text, idx)
    return meta, idx + 1


def _check_unicode(p: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{p}: corrupt safetensors file: its header holds {ascii(_cut(text))}, which is not valid Unicode "
            "(a lone surrogate)"
        ) from None


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


def open_safetensors(path: Path) -> tuple[dict[str, Any], SafetensorsReader]:
    header = check_safetensors(path)  # in file order
    return {k: k for k in header}, SafetensorsReader(path, header)


class SafetensorsReader:
    def __init__(self, path: Path, header) -> None:
        self.path = path
        self.header = header  # name -> archive.SafetensorsEntry, offsets already checked

    def dtype(self, key: str) -> str:
        return SAFETENSORS_DTYPES[self.header[key].dtype][0]

    def read(self, key: str):
        """Read the tensor's bytes at its checked offsets; float16/bfloat16 become float32 (exactly)."""
        import numpy as np

        entry = self.header[key]
        with self.path.open("rb") as fh:
            fh.seek(entry.start)
            raw = fh.read(entry.end - entry.start)
        if len(raw) != entry.end - entry.start:
            raise InputError(f"{show(self.path)}: truncated while reading {key}")
        if entry.dtype == "BF16":
            # numpy has no bfloat16: place the 16 bits in the top half of a float32.
            return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(entry.shape)
        name = SAFETENSORS_DTYPES[entry.dtype][0]
        if not hasattr(np, name):
            raise InputError(f"{show(self.path)}: {key} has dtype {name}, which bncli cannot read")
        array = np.frombuffer(raw, dtype=np.dtype(name).newbyteorder("<")).reshape(entry.shape)
        return array.astype(np.float32) if entry.dtype == "F16" else array.copy()
