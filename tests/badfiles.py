"""Build damaged checkpoints in memory: patched zip records, hand-written safetensors headers, edited pickles."""

from __future__ import annotations

import json
import struct
import zlib


def zip_records(data: bytes) -> dict[str, dict[str, int]]:
    """name -> offsets of its local header, data, central-directory entry and data descriptor (None without one)."""
    out: dict[str, dict[str, int]] = {}
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        (flags,) = struct.unpack_from("<H", data, pos + 8)
        (size,) = struct.unpack_from("<I", data, pos + 20)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        (local,) = struct.unpack_from("<I", data, pos + 42)
        name = data[pos + 46 : pos + 46 + name_len].decode()
        lname, lextra = struct.unpack_from("<HH", data, local + 26)
        start = local + 30 + lname + lextra
        descriptor = start + size if flags & 0x08 else None  # torch.save writes one after every record
        out[name] = {"central": pos, "local": local, "data": start, "size": size, "descriptor": descriptor}
        pos = data.find(b"PK\x01\x02", pos + 46 + name_len + extra_len + comment_len)
    return out


def record(data: bytes, suffix: str) -> tuple[str, dict[str, int]]:
    return next((n, r) for n, r in zip_records(data).items() if n.endswith(suffix))


def fix_crc(data: bytearray, suffix: str) -> bytearray:
    """Recompute one record's CRC-32 after its bytes were edited, so only the intended damage remains."""
    _, r = record(bytes(data), suffix)
    crc = zlib.crc32(bytes(data[r["data"] : r["data"] + r["size"]]))
    struct.pack_into("<I", data, r["local"] + 14, crc)
    struct.pack_into("<I", data, r["central"] + 16, crc)
    if r["descriptor"] is not None:
        struct.pack_into("<I", data, r["descriptor"] + 4, crc)
    return data


def declare_size(data: bytes, suffix: str, size: int) -> bytes:
    """Make the central directory claim `size` bytes for one record (compressed and uncompressed)."""
    out = bytearray(data)
    _, r = record(data, suffix)
    struct.pack_into("<II", out, r["central"] + 20, size, size)
    return bytes(out)


def set_method(data: bytes, suffix: str, method: int) -> bytes:
    out = bytearray(data)
    _, r = record(data, suffix)
    struct.pack_into("<H", out, r["central"] + 10, method)
    struct.pack_into("<H", out, r["local"] + 8, method)
    return bytes(out)


def edit_pickle(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace bytes inside data.pkl (same length) and fix its CRC: a pickle that lies, in a well-formed archive."""
    assert len(old) == len(new)
    out = bytearray(data)
    _, r = record(data, "data.pkl")
    start = out.find(old, r["data"], r["data"] + r["size"])
    assert start != -1, old
    out[start : start + len(old)] = new
    return bytes(fix_crc(out, "data.pkl"))


def safetensors(header: dict, payload: bytes = b"", header_len: int | None = None, raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + payload


def f32(values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def eocd(data: bytes) -> int:
    return data.rindex(b"PK\x05\x06")


def shift_directory(data: bytes, by: int) -> bytes:
    """The directory offset in the end record moved by `by` (the directory itself left where it is)."""
    out = bytearray(data)
    pos = eocd(data)
    (offset,) = struct.unpack_from("<I", out, pos + 16)
    struct.pack_into("<I", out, pos + 16, offset + by)
    return bytes(out)


def relocate(data: bytes, by: int) -> bytes:
    """Every offset in the directory and end record moved by `by`, as `zip -A` does for a prefixed archive."""
    out = bytearray(data)
    pos = eocd(data)
    count, cd_size, cd_offset = struct.unpack_from("<HII", out, pos + 10)
    p = cd_offset
    for _ in range(count):
        nlen, xlen, clen = struct.unpack_from("<HHH", out, p + 28)
        (lho,) = struct.unpack_from("<I", out, p + 42)
        struct.pack_into("<I", out, p + 42, lho + by)
        p += 46 + nlen + xlen + clen
    struct.pack_into("<I", out, pos + 16, cd_offset + by)
    return bytes(out)
