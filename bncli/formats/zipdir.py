"""Read a zip archive's directory with torch's rules (miniz), refusing every layout that two zip readers could read apart.

torch's reader (caffe2/serialize/inline_container.cc over miniz) finds the end record by scanning back from the end of
the file, takes the central directory's offset as written and a record's data at `local header offset + 30 + local
name length + local extra length` (`get_record_offset`); Python's `zipfile` instead shifts every offset when the
directory is not where the end record says (it assumes a prefix), and reads entries until the directory's bytes run
out rather than counting them. One file could then be archive A to one reader and archive B to the other. This module
reads the bytes the way torch does and then requires the layout in which every reader agrees: the directory exactly
where its end record places it and ending where the end record (or the zip64 end record) begins, the first local header
at byte 0, every byte of the file claimed by exactly one record (local header, data, data descriptor) or the directory,
local headers and data descriptors that agree with the directory, unique names (also ignoring ASCII case, as miniz
looks names up), and nothing after the end record but its own comment. Anything else is one InputError that says which.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from bncli.budget import MAX_ZIP_DIRECTORY_BYTES, MAX_ZIP_NAME_BYTES, Budget, human
from bncli.errors import InputError

STORED, DEFLATED = 0, 8

_EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes
_LOC64 = struct.Struct("<4sIQI")  # 20 bytes
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_CEN = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_LOC = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_EOCD_SIG, _LOC64_SIG, _EOCD64_SIG = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
_CEN_SIG, _LOC_SIG, _DD_SIG = b"PK\x01\x02", b"PK\x03\x04", b"PK\x07\x08"
_ZIP64_FIELD = 0x0001
_U16, _U32 = 0xFFFF, 0xFFFFFFFF
# The end record's comment is at most 65535 bytes; miniz scans back in 4 KB blocks, so a little further than that.
_TAIL = 22 + 0xFFFF + 2 * 4096
# Archives of many small records are read in one piece to check their local headers (a 12,000-tensor checkpoint
# is 4 MB: one read instead of 24,000); others header by header, so that no tensor data is read here.
_READ_WHOLE, _READ_WHOLE_PER_RECORD = 16 << 20, 4096

# General-purpose flags a readable record may carry: 0x0008 data descriptor (torch.save sets it), 0x0800 UTF-8 name
# (torch.save sets it); 0x0002/0x0004 are deflate's speed hints. Encryption (0x0001, 0x0040), masked headers (0x2000)
# and the rest are refused: torch cannot read them.
_FLAG_DESCRIPTOR, _FLAG_UTF8, _DEFLATE_HINTS = 0x0008, 0x0800, 0x0006
_FLAG_ENCRYPTED = 0x0001 | 0x0040 | 0x2000


@dataclass(frozen=True)
class ZipRecord:
    """One stored entry of a torch zip archive: its bytes are file[data_offset : data_offset + size]."""

    name: str  # full name inside the archive, e.g. "model/data/0"
    header_offset: int
    data_offset: int
    size: int
    crc: int


@dataclass(frozen=True)
class TorchZip:
    """A torch zip archive that passed its structure checks; `root` is the folder every record sits in."""

    root: str
    records: dict[str, ZipRecord]  # by name without the root folder: "data.pkl", "data/0", ..., in directory order

    def storage(self, key: str) -> ZipRecord | None:
        return self.records.get(f"data/{key}")


@dataclass(frozen=True)
class Member:
    """One entry of a checked zip archive (any writer): where its (possibly deflated) bytes are."""

    name: str
    header_offset: int
    data_offset: int  # what torch's get_record_offset reports
    compressed_size: int
    size: int  # inflated size (== compressed_size when stored)
    crc: int
    method: int  # STORED or DEFLATED
    end: int  # first byte after the entry's data (and its data descriptor)


@dataclass(frozen=True)
class ZipListing:
    members: tuple[Member, ...]  # in central-directory order (torch takes the root folder from the first)
    directory_offset: int
    directory_size: int
    zip64: bool


def _bytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n} bytes"


def _show(path: Path) -> str:
    from bncli.console import show

    return show(path)


def list_zip(
    path: Path, budget: Budget | None = None, *, methods: tuple[int, ...] = (STORED, DEFLATED), local_headers: bool = True
) -> ZipListing:
    """Parse and check the archive's end record, directory and every local header; raise InputError on the first problem.

    Reads only the end of the file, the directory and each local header (a few hundred bytes per entry); no data.
    `methods` are the compression methods accepted (others are refused by name). local_headers=False stops after the
    directory (for sniffing by names: every reader then runs the whole check before it reads a record); the members'
    data offsets and ends are then unknown (-1).
    """
    path = Path(path)
    where = budget.where if budget is not None else _show(path)
    try:
        with path.open("rb") as fh:
            reader = _Reader(fh.fileno(), os.fstat(fh.fileno()).st_size, where, budget, methods)
            return reader.listing(local_headers)
    except OSError as exc:
        raise InputError(f"{where}: cannot read: {exc.strerror or exc}") from None


def read_zip_directory(path: Path, budget: Budget | None = None) -> TorchZip:
    """The archive as torch reads it: list_zip's checks, then torch's layout (records stored, all in one root folder).

    Every record's data_offset equals torch's `PyTorchFileReader.get_record_offset`. Nothing is inflated or checked
    against its CRC here (torch_zip.verify_record_crc does that); data.pkl's presence and size are the caller's to check.
    """
    path = Path(path)
    where = budget.where if budget is not None else _show(path)
    listing = list_zip(path, budget, methods=(STORED, DEFLATED))
    first = listing.members[0].name
    if "/" not in first:
        raise InputError(f"{where}: corrupt torch archive: its first record {first!r} is not inside a folder")
    root = first.split("/", 1)[0]
    records: dict[str, ZipRecord] = {}
    for m in listing.members:
        if not m.name.startswith(root + "/"):
            raise InputError(f"{where}: corrupt torch archive: record {m.name!r} is outside the folder {root!r}")
        if m.method != STORED:
            raise InputError(
                f"{where}: record {m.name!r} is compressed; torch stores records uncompressed, "
                "so this archive was not written by torch.save (or was re-zipped)"
            )
        records[m.name[len(root) + 1 :]] = ZipRecord(m.name, m.header_offset, m.data_offset, m.size, m.crc)
    return TorchZip(root, records)


class _Reader:
    def __init__(self, fd: int, size: int, where: str, budget: Budget | None, methods: tuple[int, ...]) -> None:
        self.fd, self.size, self.where, self.budget, self.methods = fd, size, where, budget, methods
        self.records: bytes | None = None  # everything before the directory, when small: one read, not two per record

    def fail(self, text: str) -> InputError:
        return InputError(f"{self.where}: {text}")

    def read(self, offset: int, n: int) -> bytes:
        if self.records is not None and offset + n <= len(self.records):
            return self.records[offset : offset + n]
        return os.pread(self.fd, n, offset) if n > 0 and offset < self.size else b""

    # ------------------------------------------------------------------ end records

    def listing(self, local_headers: bool = True) -> ZipListing:
        eocd = self.find_end_record()
        cd_offset, cd_size, count, zip64, directory_end = self.end_records(eocd)
        if cd_offset + cd_size < directory_end:
            raise self.fail(
                f"refused: its zip directory is {_bytes(directory_end - cd_offset - cd_size)} away from where its end "
                "record places it (a prefixed, shifted or concatenated archive, which zip readers read differently)"
            )
        if cd_offset + cd_size > directory_end:
            raise self.fail("corrupt zip archive: its end record places the zip directory past the end record itself")
        Budget.check_entries(self.where, count, "its zip directory")
        if cd_size > MAX_ZIP_DIRECTORY_BYTES:
            raise self.fail(
                f"its zip directory is {human(cd_size)}, above the limit of {human(MAX_ZIP_DIRECTORY_BYTES)}"
            )
        if cd_size < count * _CEN.size:
            raise self.fail(f"corrupt zip archive: its directory of {cd_size} bytes cannot hold {count} entries")
        if self.budget is not None:
            self.budget.charge(cd_size, "its zip directory")
        directory = self.read(cd_offset, cd_size)
        if len(directory) != cd_size:
            raise self.fail("truncated: the file ends inside its zip directory")
        entries = self.central_entries(directory, count)
        if not entries:
            raise self.fail("empty zip archive")
        if not local_headers:
            members = [Member(e[0], e[7], -1, e[5], e[6], e[4], e[3], -1) for e in entries]
            return ZipListing(tuple(members), cd_offset, cd_size, zip64)
        if cd_offset <= min(_READ_WHOLE, _READ_WHOLE_PER_RECORD * len(entries)):
            self.records = self.read(0, cd_offset)
        members = self.local_headers(entries, cd_offset)
        return ZipListing(tuple(members), cd_offset, cd_size, zip64)

    def find_end_record(self) -> int:
        """Where miniz finds the end record: the last signature with at least 22 bytes after it."""
        start = max(0, self.size - _TAIL)
        tail = self.read(start, self.size - start)
        pos = tail.rfind(_EOCD_SIG, 0, max(0, len(tail) - _EOCD.size + 4))
        if pos < 0:
            raise self.fail(
                "truncated: the file ends before its zip directory (probably cut short, e.g. an interrupted download)"
            )
        comment_len = _EOCD.unpack_from(tail, pos)[7]
        after = len(tail) - pos - _EOCD.size
        if tail.find(_EOCD_SIG, pos + 1) != -1:
            raise self.fail("corrupt zip archive: the bytes after its end record hold another end record")
        if comment_len != after:
            if comment_len > after:
                raise self.fail(
                    "truncated: the file ends inside its zip end record's comment (probably cut short, "
                    "e.g. an interrupted download)"
                )
            raise self.fail(
                f"refused: {_bytes(after - comment_len)} after its zip end record (appended data, which zip readers "
                "read differently)"
            )
        return start + pos

    def end_records(self, eocd: int) -> tuple[int, int, int, bool, int]:
        """(directory offset, directory size, entry count, zip64?, where the directory must end)."""
        _, disk, cd_disk, on_disk, total, cd_size, cd_offset, _ = _EOCD.unpack(self.read(eocd, _EOCD.size))
        locator = self.read(eocd - _LOC64.size, _LOC64.size) if eocd >= _LOC64.size else b""
        if not locator.startswith(_LOC64_SIG):
            if disk or cd_disk or on_disk != total:
                raise self.fail("corrupt zip archive: it claims to span several disks")
            return cd_offset, cd_size, total, False, eocd
        # zip64: the locator names the zip64 end record, which must sit right before it (Python's zipfile assumes so,
        # miniz follows the offset): both readers then see the same one.
        _, z_disk, z_offset, disks = _LOC64.unpack(locator)
        record_at = eocd - _LOC64.size - _EOCD64.size
        if z_offset != record_at or record_at < 0:
            raise self.fail("corrupt zip archive: its zip64 end record is not right before its locator")
        raw = self.read(z_offset, _EOCD64.size)
        (sig, rec_size, _, _, disk64, cd_disk64, on_disk64, total64, cd_size64, cd_offset64) = _EOCD64.unpack(raw)
        if sig != _EOCD64_SIG or rec_size != _EOCD64.size - 12:
            raise self.fail("corrupt zip archive: its zip64 end record is damaged")
        if z_disk or disks != 1 or disk64 or cd_disk64 or on_disk64 != total64 or disk or cd_disk:
            raise self.fail("corrupt zip archive: it claims to span several disks")
        for short, long, limit in ((total, total64, _U16), (on_disk, on_disk64, _U16), (cd_size, cd_size64, _U32),
                                   (cd_offset, cd_offset64, _U32)):
            if short not in (long, limit):
                raise self.fail("corrupt zip archive: its end record and its zip64 end record disagree")
        if cd_size64 > _U32 or total64 > _U32:  # miniz's own limits
            raise self.fail("corrupt zip archive: its zip64 directory is larger than torch can read")
        return cd_offset64, cd_size64, total64, True, z_offset

    # ------------------------------------------------------------------ the central directory

    def central_entries(self, directory: bytes, count: int) -> list[tuple]:
        """Exactly `count` entries that fill the directory (Python's zipfile reads entries until the bytes run out)."""
        entries = []
        seen: dict[str, str] = {}
        folded: dict[bytes, str] = {}
        p = 0
        for _ in range(count):
            if p + _CEN.size > len(directory):
                raise self.fail("corrupt zip archive: its directory ends before its last entry")
            (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, disk, _, _, lho) = _CEN.unpack_from(
                directory, p
            )
            if sig != _CEN_SIG:
                raise self.fail(f"corrupt zip archive: no directory entry at byte {p} of its directory")
            end = p + _CEN.size + nlen + xlen + clen
            if end > len(directory):
                raise self.fail("corrupt zip archive: a directory entry runs past the end of its directory")
            raw_name = directory[p + _CEN.size : p + _CEN.size + nlen]
            name = self.name(raw_name, flags)
            extra = directory[p + _CEN.size + nlen : p + _CEN.size + nlen + xlen]
            fields = self.extra_fields(extra, name, "directory entry")
            sentinels = [v == _U32 for v in (usize, csize, lho)]
            if any(sentinels):
                values = self.zip64_values(fields.get(_ZIP64_FIELD), name, sum(sentinels))
                if sentinels[0]:
                    usize = values.pop(0)
                if sentinels[1]:
                    csize = values.pop(0)
                if sentinels[2]:
                    lho = values.pop(0)
            if disk:
                raise self.fail(f"corrupt zip archive: record {name!r} claims to be on another disk")
            self.check_flags(name, flags, method)
            if method == STORED and csize != usize:
                raise self.fail(f"corrupt zip archive: record {name!r} declares two different sizes")
            if name in seen:
                raise self.fail(f"corrupt zip archive: two records named {name!r}")
            key = raw_name.lower()  # miniz compares names ignoring ASCII case only
            if key in folded:
                raise self.fail(
                    f"corrupt zip archive: records {folded[key]!r} and {name!r} differ only in case "
                    "(torch looks names up ignoring case, so either could be read)"
                )
            seen[name] = name
            folded[key] = name
            entries.append((name, raw_name, flags, method, crc, csize, usize, lho))
            p = end
        if p != len(directory):
            raise self.fail(
                f"corrupt zip archive: {_bytes(len(directory) - p)} after the last of its {count} directory entries "
                "(zip readers disagree on how many records it holds)"
            )
        return entries

    def name(self, raw: bytes, flags: int) -> str:
        shown = raw[:80].decode("utf-8", "backslashreplace")
        if not raw:
            raise self.fail("corrupt zip archive: a record has an empty name")
        if len(raw) > MAX_ZIP_NAME_BYTES:
            raise self.fail(f"corrupt zip archive: the record name {shown!r}... is longer than {MAX_ZIP_NAME_BYTES} bytes")
        if b"\0" in raw:
            raise self.fail(f"corrupt zip archive: the record name {shown!r} holds a NUL byte")
        if not raw.isascii() and not flags & _FLAG_UTF8:
            # Python's zipfile would read it as cp437, torch as raw bytes: two names for one record.
            raise self.fail(f"corrupt zip archive: the record name {shown!r} is not ASCII and not marked UTF-8")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"corrupt zip archive: the record name {shown!r} is not valid UTF-8") from None

    def check_flags(self, name: str, flags: int, method: int) -> None:
        if flags & _FLAG_ENCRYPTED:
            raise self.fail(f"corrupt zip archive: record {name!r} is encrypted")
        allowed = _FLAG_DESCRIPTOR | _FLAG_UTF8 | (_DEFLATE_HINTS if method == DEFLATED else 0)
        if flags & ~allowed:
            raise self.fail(f"corrupt zip archive: record {name!r} has flags {flags:#06x} that torch cannot read")
        if method not in self.methods:
            kind = {STORED: "stored", DEFLATED: "deflated"}.get(method, f"compressed with method {method}")
            raise self.fail(f"record {name!r} is {kind}, which bncli does not read in this file")

    def extra_fields(self, extra: bytes, name: str, where: str) -> dict[int, bytes]:
        """The extra field's (id -> data): they must tile it exactly, each id once."""
        fields: dict[int, bytes] = {}
        q = 0
        while q < len(extra):
            if q + 4 > len(extra):
                raise self.fail(f"corrupt zip archive: the {where} of record {name!r} ends inside an extra field")
            fid, flen = struct.unpack_from("<HH", extra, q)
            if q + 4 + flen > len(extra):
                raise self.fail(f"corrupt zip archive: an extra field of record {name!r} runs past its {where}")
            if fid in fields:
                raise self.fail(f"corrupt zip archive: the {where} of record {name!r} repeats extra field {fid:#06x}")
            fields[fid] = extra[q + 4 : q + 4 + flen]
            q += 4 + flen
        return fields

    def zip64_values(self, data: bytes | None, name: str, needed: int) -> list[int]:
        if data is None or len(data) < 8 * needed:
            raise self.fail(f"corrupt zip archive: record {name!r} lacks the zip64 sizes its directory entry refers to")
        return list(struct.unpack_from(f"<{needed}Q", data))

    # ------------------------------------------------------------------ local headers and the layout

    def local_headers(self, entries: list[tuple], cd_offset: int) -> list[Member]:
        members: dict[str, Member] = {}
        for name, raw_name, flags, method, crc, csize, usize, lho in sorted(entries, key=lambda e: e[7]):
            head = self.read(lho, _LOC.size + len(raw_name) + 256)
            if len(head) < _LOC.size or head[:4] != _LOC_SIG:
                raise self.fail(f"corrupt zip archive: no local header for record {name!r} at offset {lho}")
            (_, _, lflags, lmethod, _, _, lcrc, lcsize, lusize, lnlen, lxlen) = _LOC.unpack_from(head)
            if len(head) < _LOC.size + lnlen + lxlen:
                head = self.read(lho, _LOC.size + lnlen + lxlen)
                if len(head) < _LOC.size + lnlen + lxlen:
                    raise self.fail(f"truncated or corrupt: the local header of record {name!r} runs past the file")
            if head[_LOC.size : _LOC.size + lnlen] != raw_name:
                raise self._disagree(name, "its name")
            if lmethod != method:
                raise self._disagree(name, "compression method")
            if lflags != flags:
                raise self._disagree(name, "flags")
            fields = self.extra_fields(head[_LOC.size + lnlen : _LOC.size + lnlen + lxlen], name, "local header")
            z64 = fields.get(_ZIP64_FIELD)
            self.check_local_values(name, flags, (lcrc, lcsize, lusize), (crc, csize, usize), z64, lho)
            data_offset = lho + _LOC.size + lnlen + lxlen
            data_end = data_offset + csize
            if data_end > cd_offset:
                raise self.fail(
                    f"truncated or corrupt: record {name!r} declares {human(csize)} but the file has only {human(self.size)}"
                )
            end = data_end
            if flags & _FLAG_DESCRIPTOR:
                end = self.check_descriptor(name, data_end, z64 is not None, (crc, csize, usize), cd_offset)
            members[name] = Member(name, lho, data_offset, csize, usize, crc, method, end)
        self.check_layout(sorted(members.values(), key=lambda m: m.header_offset), cd_offset)
        return [members[e[0]] for e in entries]

    def _disagree(self, name: str, what: str) -> InputError:
        return self.fail(f"corrupt zip archive: the local header of record {name!r} disagrees with the zip directory ({what})")

    def check_local_values(self, name: str, flags: int, local: tuple, central: tuple, z64: bytes | None, lho: int) -> None:
        lcrc, lcsize, lusize = local
        crc, csize, usize = central
        deferred = bool(flags & _FLAG_DESCRIPTOR)  # values may be zero here and follow the data instead
        if lcrc != crc and not (deferred and lcrc == 0):
            raise self._disagree(name, "CRC-32")
        z_sizes = None
        if z64 is not None:
            if len(z64) % 8 or not 8 <= len(z64) <= 24:
                raise self.fail(f"corrupt zip archive: the zip64 field of record {name!r}'s local header is damaged")
            values = list(struct.unpack(f"<{len(z64) // 8}Q", z64))
            # What miniz writes (sizes, then the header's own offset, each only when large; under a data descriptor
            # the compressed size is still zero there) and what Python's zipfile writes (both sizes).
            def fits(value: int, real: int) -> bool:
                return value == real or (deferred and value == 0)

            shape_ok = (values == [lho]) or (
                len(values) in (2, 3) and fits(values[0], usize) and fits(values[1], csize) and values[2:] in ([], [lho])
            )
            if not shape_ok:
                raise self._disagree(name, "zip64 sizes")
            z_sizes = values[:2] if len(values) >= 2 else None
        for value, real in ((lcsize, csize), (lusize, usize)):
            if value == real or (deferred and value == 0) or (value == _U32 and z_sizes is not None):
                continue
            raise self._disagree(name, "sizes")

    def check_descriptor(self, name: str, data_end: int, wide: bool, central: tuple, cd_offset: int) -> int:
        """The data descriptor after a record's data: its signature is optional in the format (miniz and zipfile write
        it); either way its values must be the directory's. Returns where the record ends."""
        values = "<IQQ" if wide else "<III"
        raw = self.read(data_end, 4 + struct.calcsize(values))
        with_sig = raw.startswith(_DD_SIG)
        body = raw[4:] if with_sig else raw[: struct.calcsize(values)]
        end = data_end + (4 if with_sig else 0) + struct.calcsize(values)
        if end > cd_offset or len(body) != struct.calcsize(values):
            raise self.fail(f"corrupt zip archive: the data descriptor of record {name!r} overlaps the zip directory")
        if struct.unpack(values, body) != central:
            raise self.fail(
                f"corrupt zip archive: the data descriptor of record {name!r} disagrees with the zip directory"
            )
        return end

    def check_layout(self, members: list[Member], cd_offset: int) -> None:
        """Every byte before the directory belongs to exactly one record, the first at byte 0."""
        first = members[0]
        if first.header_offset != 0:
            raise self.fail(
                f"refused: {_bytes(first.header_offset)} before its first zip record {first.name!r} (a prefixed or "
                "concatenated archive, which zip readers read differently)"
            )
        for a, b in zip(members, members[1:], strict=False):
            if b.header_offset < a.end:
                raise self.fail(f"corrupt zip archive: records {a.name!r} and {b.name!r} overlap")
            if b.header_offset > a.end:
                raise self.fail(
                    f"refused: {_bytes(b.header_offset - a.end)} between zip records {a.name!r} and {b.name!r}, claimed by "
                    "no record (hidden data that zip readers read differently)"
                )
        last = members[-1]
        if last.end != cd_offset:
            raise self.fail(
                f"refused: {_bytes(cd_offset - last.end)} between its last zip record {last.name!r} and its directory, "
                "claimed by no record (hidden data that zip readers read differently)"
            )
