"""bncli's zip reader against torch's own (miniz, in a child process): for every archive, odd, hostile or fuzzed,
bncli either refuses it or reports exactly the record names, data offsets and bytes that torch reads."""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from badfiles import eocd, relocate, shift_directory
from conftest import bn_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bncli import budget
from bncli.errors import InputError
from bncli.formats.torch_zip import check_torch_zip
from bncli.formats.zipdir import list_zip, read_zip_directory
from bncli.loading import load_checkpoint, sniff

EXAMPLES = int(os.environ.get("BNCLI_FUZZ_EXAMPLES", "40"))

# The child: one torch import, then one archive per line of stdin, one JSON line back. torch's reader is C++ over
# hostile bytes, so it runs in a process of its own; a crash there is a refusal by torch, never a failure here.
SERVER = r"""
import json, sys, warnings, zlib
import torch
warnings.simplefilter("ignore")

def first(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

def summary(obj):
    if isinstance(obj, dict):
        return {str(k): summary(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return [list(obj.shape), repr(obj.double().sum().item()) if obj.numel() else "empty"]
    return type(obj).__name__

for line in sys.stdin:
    mode, path = line.rstrip("\n").split(" ", 1)
    out = {}
    try:
        reader = torch._C.PyTorchFileReader(path)
        records = {}
        for name in reader.get_all_records():
            try:
                offset = reader.get_record_offset(name)
                if mode == "offsets":
                    records[name] = [offset]
                    continue
                data = reader.get_record(name)
                records[name] = [offset, len(data), zlib.crc32(data)]
            except Exception as exc:
                records[name] = ["error", first(exc)]
        out["records"] = records
    except Exception as exc:
        out["open_error"] = first(exc)
    if mode == "offsets":
        print(json.dumps(out), flush=True)
        continue
    try:
        out["load"] = summary(torch.load(path, weights_only=True, map_location="cpu"))
    except Exception as exc:
        out["load_error"] = first(exc)
    print(json.dumps(out), flush=True)
"""


class TorchReader:
    """torch's view of an archive, from the child; restarted if hostile bytes ever crash it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def __call__(self, path: Path, offsets_only: bool = False) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{'offsets' if offsets_only else 'all'} {path}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:  # the child died on this file
            self.proc = None
            return {"open_error": "crashed", "load_error": "crashed"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def torch_view():
    reader = TorchReader()
    yield reader
    reader.close()


def bncli_view(path: Path) -> dict | str:
    """name -> [data offset, size, CRC-32 of the bytes there] as bncli reads them, or the refusal's message."""
    try:
        archive = read_zip_directory(path)
    except InputError as exc:
        return exc.message
    raw = path.read_bytes()
    return {
        name: [r.data_offset, r.size, zlib.crc32(raw[r.data_offset : r.data_offset + r.size])]
        for name, r in archive.records.items()
        if not name.endswith(".debug_pkl")  # torch lists those only when asked for debug symbols
    }


def assert_parity(path: Path, torch_view) -> dict | str:
    """bncli refuses, or sees exactly what torch sees. Returns bncli's view."""
    ours = bncli_view(path)
    if isinstance(ours, str):
        assert "\n" not in ours and ours.startswith(str(path))
        return ours
    theirs = torch_view(path)
    assert "open_error" not in theirs, f"bncli accepted an archive torch cannot open: {theirs['open_error']}"
    assert ours == theirs["records"]
    return ours


# --------------------------------------------------------------------------- building archives


def torch_records(obj=None) -> list[tuple[str, bytes]]:
    """The records of a real torch.save archive, in its order, with their full names."""
    buf = io.BytesIO()
    torch.save(bn_state(3) if obj is None else obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def torch_bytes(obj=None) -> bytes:
    buf = io.BytesIO()
    torch.save(bn_state(3) if obj is None else obj, buf)
    return buf.getvalue()


U32 = 0xFFFFFFFF


def build_zip(
    records,
    *,
    descriptor: bool = True,
    align: int = 64,
    zip64: bool = False,
    comment: bytes = b"",
    extra: bytes = b"",
    descriptor_signature: bool = True,
    out=None,
) -> bytes:
    """A torch-like archive written by hand, so that each field can be made odd: (name, bytes or a hole size) records.

    descriptor: flag 0x08, zeros in the local header and a data descriptor after the data (as torch.save writes);
    zip64: a zip64 end record and locator, every local header offset through a zip64 field (miniz's layout above
    4 GB, forced); extra: an extra field placed in every local header and directory entry before the padding.
    A record given as an int is a hole of that many bytes (sparse when `out` is a file).
    """
    fh = out if out is not None else io.BytesIO()
    central = []
    flags = 0x0808 if descriptor else 0x0800
    for name, data in records:
        raw_name = name.encode()
        lho = fh.tell()
        size = data if isinstance(data, int) else len(data)
        crc = 0 if isinstance(data, int) else zlib.crc32(data)
        big = size >= U32
        local_z64 = b""
        if zip64 or big or lho >= U32:
            values = ([size, 0 if descriptor else size] if big else []) + ([lho] if zip64 or lho >= U32 else [])
            local_z64 = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values)
        start = lho + 30 + len(raw_name) + len(local_z64) + len(extra) + 4
        pad = (-start) % align if align else 0
        local_extra = local_z64 + extra + (struct.pack("<HH", 0x4246, pad) + b"Z" * pad if align else b"")
        lsize = U32 if big and not descriptor else (0 if descriptor else size)
        fh.write(
            struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45 if local_z64 else 20, flags, 0, 0, 0x21,
                        0 if descriptor else crc, lsize, lsize, len(raw_name), len(local_extra))
            + raw_name + local_extra
        )
        if isinstance(data, int):
            fh.seek(data, 1)
        else:
            fh.write(data)
        if descriptor:
            fields = struct.pack("<IQQ" if local_z64 else "<III", crc, size, size)
            fh.write((b"PK\x07\x08" if descriptor_signature else b"") + fields)
        central.append((raw_name, crc, size, lho))
    cd_offset = fh.tell()
    for raw_name, crc, size, lho in central:
        fields = ([size, size] if size >= U32 else []) + ([lho] if zip64 or lho >= U32 else [])
        z64 = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        csize = U32 if size >= U32 else size
        fh.write(
            struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45 if z64 else 20, flags, 0, 0, 0x21, crc, csize,
                        csize, len(raw_name), len(z64) + len(extra), 0, 0, 0, 0, U32 if zip64 or lho >= U32 else lho)
            + raw_name + z64 + extra
        )
    cd_size = fh.tell() - cd_offset
    n = len(central)
    if zip64:
        z_offset = fh.tell()
        fh.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_offset))
        fh.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, z_offset, 1))
    fh.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, cd_size, U32 if zip64 else cd_offset, len(comment)))
    fh.write(comment)
    return b"" if out is not None else fh.getvalue()


def write(tmp_path: Path, data: bytes, name: str = "case.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- archives torch reads: same view


def test_torch_save_archives_read_as_torch_reads_them(tmp_path, torch_view):
    for i, obj in enumerate([bn_state(3), {"empty": torch.zeros(0), "x": torch.arange(5.0)}, {"one": torch.ones(())}]):
        path = write(tmp_path, torch_bytes(obj), f"ok{i}.pt")
        ours = assert_parity(path, torch_view)
        assert isinstance(ours, dict) and "data.pkl" in ours


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"descriptor": False},
        {"align": 0},
        {"zip64": True},
        {"zip64": True, "descriptor": False},
        {"comment": b"written by hand"},
        {"descriptor_signature": False},  # optional in the format
        {"descriptor_signature": False, "zip64": True},
        {"extra": struct.pack("<HH", 0xCAFE, 5) + b"odd!!"},  # an extra field of odd length, everywhere
        {"extra": struct.pack("<HH", 0x7075, 3) + b"\x01ab", "descriptor": False},
    ],
    ids=["torch-like", "no-descriptor", "unaligned", "zip64", "zip64-no-descriptor", "comment", "unsigned-descriptor",
         "zip64-unsigned-descriptor", "odd-extra",
         "odd-extra-no-descriptor"],
)
def test_odd_but_valid_archives_read_exactly_as_torch(tmp_path, torch_view, options):
    """Layouts other writers produce: bncli accepts them, with torch's names and offsets, and torch.load agrees."""
    path = write(tmp_path, build_zip(torch_records(), **options))
    ours = assert_parity(path, torch_view)
    assert isinstance(ours, dict), ours
    assert "load" in torch_view(path)
    ckpt = load_checkpoint(path)
    assert sorted(ckpt) == sorted(torch.load(path, weights_only=True))


def test_python_zipfile_archives_with_zip64_local_headers(tmp_path, torch_view):
    """zipfile's force_zip64 (what numpy writes) puts zip64 sizes in every local header."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in torch_records():
            with zf.open(name, "w", force_zip64=True) as member:
                member.write(data)
    path = write(tmp_path, buf.getvalue())
    assert isinstance(assert_parity(path, torch_view), dict)


def test_archive_above_4_gb_with_zip64_records(tmp_path, torch_view):
    """Records past 4 GB (miniz's own layout: zip64 fields in the local headers too), as a sparse file."""
    records = torch_records()
    path = tmp_path / "big.pt"
    with path.open("wb") as fh:
        build_zip([("big/padding", 0x1_0000_0100)] + [(n.replace(n.split("/")[0], "big", 1), d) for n, d in records],
                  zip64=True, out=fh)
    if path.stat().st_blocks * 512 > 1 << 30:
        pytest.skip("this file system does not keep holes: a 4 GB file would be written in full")
    ours = read_zip_directory(path)
    theirs = torch_view(path, offsets_only=True)["records"]  # reading 4 GB of holes would take a while
    assert set(theirs) == set(ours.records)
    for name, r in ours.records.items():
        assert theirs[name][0] == r.data_offset
    assert ours.records["data.pkl"].data_offset > U32


# --------------------------------------------------------------------------- the two-parsers attack


def two_archives(a: bytes, b: bytes) -> bytes:
    """One file that is archive A to Python's zipfile and archive B to torch's reader.

    zipfile reads the directory where it is (just before the end record) and shifts every offset by the distance to
    where the end record places it; torch reads the directory at the offset as written. So: B's records and
    directory where the end record points, A's records after them and A's directory last, with B's entry count.
    """
    a_cd = eocd(a)
    (a_count, a_cd_size, a_cd_offset) = struct.unpack_from("<HII", a, a_cd + 10)
    b_end = eocd(b)
    (b_count, b_cd_size, b_cd_offset) = struct.unpack_from("<HII", b, b_end + 10)
    b_part = b[:b_cd_offset]
    b_cd = b[b_cd_offset : b_cd_offset + b_cd_size]
    assert len(b_part) <= a_cd_offset and b_cd_size <= a_cd_size and b_count * 46 <= a_cd_size
    head = b_part + b"\0" * (a_cd_offset - len(b_part)) + b_cd  # B's directory sits at A's directory offset
    shift = len(head)
    body = head + a[:a_cd_offset]  # A's records, at their offsets + shift
    directory = a[a_cd_offset : a_cd_offset + a_cd_size]
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, b_count, b_count, a_cd_size, a_cd_offset, 0)
    assert len(body) == shift + a_cd_offset
    return body + directory + end


def test_a_file_that_is_two_archives_is_refused(tmp_path, torch_view):
    a_state = {f"a{i}.running_var": torch.full((4,), 1.0) for i in range(6)}
    b_state = {"b.running_var": torch.full((4,), -7.0)}
    path = write(tmp_path, two_archives(build_zip(torch_records(a_state)), build_zip(torch_records(b_state))))
    with zipfile.ZipFile(path) as zf:  # Python's zipfile sees A ...
        assert any(n.endswith("data/5") for n in zf.namelist())
        assert zf.testzip() is None
    seen = torch_view(path)  # ... torch sees and loads B
    assert seen["load"] == {"b.running_var": [[4], "-28.0"]}
    with pytest.raises(InputError, match="zip directory is .* bytes away from where its end record places it"):
        read_zip_directory(path)
    with pytest.raises(InputError, match="zip directory is"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- hostile layouts: refused, each saying why


def _cases(raw: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (archive, what the refusal says)."""
    plain = build_zip(torch_records(), descriptor=False)
    e = eocd(raw)
    count, cd_size, cd = struct.unpack_from("<HII", raw, e + 10)

    def central(data: bytes, i: int) -> int:
        c = struct.unpack_from("<I", data, eocd(data) + 16)[0]
        for _ in range(i):
            nlen, xlen, clen = struct.unpack_from("<HHH", data, c + 28)
            c += 46 + nlen + xlen + clen
        return c

    def patch(data: bytes, at: int, fmt: str, *values) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, at, *values)
        return bytes(out)

    second = central(raw, 1)
    lho1 = struct.unpack_from("<I", raw, second + 42)[0]
    name1 = raw[second + 46 : second + 46 + struct.unpack_from("<H", raw, second + 28)[0]]
    rename = name1[:-1] + (b"X" if name1[-1:] != b"X" else b"Y")
    p2 = central(plain, 2)
    p_lho2 = struct.unpack_from("<I", plain, p2 + 42)[0]
    p_lho3 = struct.unpack_from("<I", plain, central(plain, 3) + 42)[0]
    cases = {
        "prefixed": (b"#!/bin/sh\n" * 10 + raw, "zip directory is 100 bytes away from where its end record places it"),
        "prefixed-relocated": (b"\0" * 100 + relocate(raw, 100), "100 bytes before its first zip record"),
        "concatenated": (raw + raw, "zip directory is"),
        "concatenated-relocated": (raw + relocate(raw, len(raw)), "bytes before its first zip record"),
        "directory-shifted-back": (shift_directory(raw, -8), "zip directory is 8 bytes away"),
        "directory-shifted-forward": (shift_directory(raw, 8), "its end record places the zip directory past"),
        "directory-moved-later": (raw[:cd] + b"\0" * 8 + raw[cd:], "zip directory is 8 bytes away"),
        "gap-before-directory": (shift_directory(raw[:cd] + b"\0" * 8 + raw[cd:], 8),
                                 "8 bytes between its last zip record"),
        "appended-data": (raw + b"trailing", "8 bytes after its zip end record"),
        "comment-with-end-record": (raw[:-2] + struct.pack("<H", 10) + b"see PK\x05\x06",
                                    "hold another end record"),
        "comment-is-an-end-record": (raw[:-2] + struct.pack("<H", 22) + b"PK\x05\x06" + b"\0" * 18,
                                     "zip directory is"),
        "one-entry-too-few": (patch(raw, e + 8, "<HH", count - 1, count - 1),
                              "bytes after the last of its"),
        "duplicate-name": (build_zip(torch_records() + [torch_records()[1]]), "two records named"),
        "names-differ-in-case": (_case_twins(), "differ only in case"),
        "local-name-differs": (raw[:lho1 + 30] + rename[: len(name1)] + raw[lho1 + 30 + len(name1):]
                               if len(rename) == len(name1) else raw, "disagrees with the zip directory (its name)"),
        "local-size-differs": (patch(plain, p_lho2 + 18, "<I", 1), "disagrees with the zip directory (sizes)"),
        "local-crc-differs": (patch(plain, p_lho2 + 14, "<I", 1), "disagrees with the zip directory (CRC-32)"),
        "local-method-differs": (patch(plain, p_lho2 + 8, "<H", 8), "compression method"),
        "local-flags-differ": (patch(raw, lho1 + 6, "<H", 0x0800), "disagrees with the zip directory (flags)"),
        "descriptor-differs": (patch(raw, lho1 - 16 + 4, "<I", 0x12345678), "data descriptor of record"),
        "encrypted": (patch(patch(raw, second + 8, "<H", 0x0809), lho1 + 6, "<H", 0x0809), "is encrypted"),
        "unknown-flags": (patch(patch(raw, second + 8, "<H", 0x4808), lho1 + 6, "<H", 0x4808), "flags 0x4808"),
        "overlapping": (patch(patch(plain, p2 + 20, "<II", p_lho3 - p_lho2 + 10, p_lho3 - p_lho2 + 10),
                              p_lho2 + 18, "<II", p_lho3 - p_lho2 + 10, p_lho3 - p_lho2 + 10), "overlap"),
        "local-extra-odd-tail": (_odd_local_extra(plain, p_lho2), "ends inside an extra field"),
        "record-on-another-disk": (patch(raw, second + 34, "<H", 1), "on another disk"),
        "multi-disk": (patch(raw, e + 4, "<H", 1), "span several disks"),
        "too-many-entries": (patch(raw, e + 8, "<HH", 0xFFFF, 0xFFFF) if budget.MAX_ENTRIES < 0xFFFF else
                             _many_entries(raw), "entries, above the limit"),
        "name-with-nul": (raw.replace(name1, name1[:-1] + b"\0"), "holds a NUL byte"),
        "name-not-utf8": (raw.replace(name1, name1[:-1] + b"\xff"), "is not valid UTF-8"),
        "truncated": (raw[: len(raw) // 2], "the file ends before its zip directory (probably cut short"),
        "truncated-end-record": (raw[:-1], "the file ends before its zip directory"),
        "compressed": (_deflated(), "is compressed; torch stores records uncompressed"),
    }
    return cases


def _many_entries(raw: bytes) -> bytes:
    z = build_zip(torch_records(), zip64=True)
    out = bytearray(z)
    z_offset = struct.unpack_from("<Q", out, eocd(z) - 20 + 8)[0]
    struct.pack_into("<QQ", out, z_offset + 24, budget.MAX_ENTRIES + 1, budget.MAX_ENTRIES + 1)
    struct.pack_into("<HH", out, eocd(z) + 8, 0xFFFF, 0xFFFF)
    return bytes(out)


def _case_twins() -> bytes:
    records = torch_records()
    root = records[0][0].split("/")[0]
    return build_zip(records + [(f"{root}/Data.pkl", b"x")])


def _odd_local_extra(plain: bytes, lho: int) -> bytes:
    """One more byte in a local header's extra length: the data starts a byte later for torch, inside the padding."""
    out = bytearray(plain)
    (xlen,) = struct.unpack_from("<H", out, lho + 28)
    struct.pack_into("<H", out, lho + 28, xlen + 1)
    return bytes(out)


def _deflated() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in torch_records():
            zf.writestr(name, data)
    return buf.getvalue()


def base_archive() -> bytes:
    """torch.save's records in a torch-like layout (descriptors, 64-byte alignment) with a plain end record."""
    return build_zip(torch_records())


@functools.lru_cache(maxsize=1)
def all_cases() -> dict[str, tuple[bytes, str]]:
    real = torch_bytes()  # torch.save always writes zip64 end records: the locator must then match too
    return {
        **_cases(base_archive()),
        "torch-save-prefixed": (b"\0" * 100 + real, "its zip64 end record is not right before its locator"),
        "torch-save-concatenated": (real + real, "its zip64 end record is not right before its locator"),
    }


CASES = list(all_cases())


@pytest.mark.parametrize("case", CASES)
def test_hostile_layouts_are_refused_saying_why(tmp_path, torch_view, case):
    data, why = all_cases()[case]
    path = write(tmp_path, data)
    ours = assert_parity(path, torch_view)
    assert isinstance(ours, str), f"accepted: {ours}"
    assert why in ours
    with pytest.raises(InputError) as info:  # the whole load path refuses too, with the same line
        load_checkpoint(path)
    if data.startswith(b"PK\x03\x04"):
        assert info.value.message == ours
    else:  # not even a zip by its first bytes (torch.load would take it for a legacy file)
        assert "not a checkpoint bncli can read" in info.value.message


def test_gaps_and_prefixes_also_refused_when_torch_reads_them(tmp_path, torch_view):
    """Layouts torch itself reads (it follows the offsets as written) are refused all the same: hidden bytes."""
    raw = base_archive()
    for data in (b"\0" * 100 + relocate(raw, 100), _gap_before_directory(raw), raw + b"trailing"):
        path = write(tmp_path, data)
        assert "records" in torch_view(path)  # torch opens it ...
        assert isinstance(bncli_view(path), str)  # ... bncli does not


def _gap_before_directory(raw: bytes) -> bytes:
    cd = struct.unpack_from("<I", raw, eocd(raw) + 16)[0]
    return shift_directory(raw[:cd] + b"\0" * 8 + raw[cd:], 8)


def test_sniff_and_npz_use_the_same_rules(tmp_path):
    """sniff reads the directory with the same parser, the .npz reader the whole archive, before numpy sees it."""
    import numpy as np

    from bncli.loading import load_tensor

    buf = io.BytesIO()
    np.savez(buf, x=np.ones(3))
    good = write(tmp_path, buf.getvalue(), "good.npz")
    assert sniff(good) == "npz"
    # A prefix that itself looks like a local header: zipfile (so numpy) shifts every offset and reads the archive.
    prefix = b"PK\x03\x04" + b"\0" * 60
    shifted = write(tmp_path, prefix + buf.getvalue(), "shifted.npz")
    with np.load(shifted) as z:
        assert list(z.files) == ["x"]
    with pytest.raises(InputError, match="zip directory is 64 bytes away"):
        sniff(shifted)
    # The same with its offsets relocated, as `zip -A` does: numpy reads it too; bncli refuses the hidden prefix.
    relocated = write(tmp_path, prefix + relocate(buf.getvalue(), len(prefix)), "relocated.npz")
    with np.load(relocated) as z:
        assert list(z.files) == ["x"]
    with pytest.raises(InputError, match="64 bytes before its first zip record"):
        load_tensor(relocated)


def test_records_listed_in_directory_order_with_torch_offsets(tmp_path, torch_view):
    path = write(tmp_path, base_archive())
    archive = check_torch_zip(path)
    theirs = torch_view(path)["records"]
    assert list(archive.records) == list(theirs)
    assert [r.data_offset for r in archive.records.values()] == [v[0] for v in theirs.values()]
    listing = list_zip(path)
    assert listing.members[0].header_offset == 0 and listing.directory_offset + listing.directory_size == eocd(
        path.read_bytes()
    )


# --------------------------------------------------------------------------- fuzz: mutated torch.save archives


def _field_offsets(raw: bytes) -> list[int]:
    """Offsets of every header field of an archive: where mutations are most likely to matter."""
    spots = []
    for sig, fields in ((b"PK\x03\x04", (4, 6, 8, 14, 18, 22, 26, 28)), (b"PK\x01\x02", (8, 10, 16, 20, 24, 28, 30, 32, 34, 42)),
                        (b"PK\x05\x06", (4, 6, 8, 10, 12, 16, 20)), (b"PK\x07\x08", (4, 8, 12)),
                        (b"PK\x06\x06", (4, 12, 16, 20, 24, 32, 40, 48)), (b"PK\x06\x07", (4, 8, 16))):
        pos = raw.find(sig)
        while pos != -1:
            spots.extend(pos + f for f in fields)
            pos = raw.find(sig, pos + 1)
    return spots


SEED_ARCHIVES = [
    torch_bytes(),
    torch_bytes({"w": torch.ones(2), "v": torch.zeros(0)}),
    build_zip(torch_records()),
    build_zip(torch_records(), descriptor=False, align=0),
]


@st.composite
def mutated(draw):
    raw = bytearray(draw(st.sampled_from(SEED_ARCHIVES)))
    spots = _field_offsets(bytes(raw))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["u16", "u32"] * 4 + ["byte", "insert", "delete", "prefix", "append"]))
        at = draw(st.sampled_from(spots)) if kind in ("u16", "u32") else draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind in ("u16", "u32"):
            width = 2 if kind == "u16" else 4
            (old,) = struct.unpack_from("<H" if width == 2 else "<I", raw, at) if at + width <= len(raw) else (0,)
            new = draw(st.sampled_from([0, 1, old + 1, old - 1, old + 16, old - 16, old + 64, 0xFFFF, U32]))
            new &= (1 << (8 * width)) - 1
            if at + width <= len(raw):
                struct.pack_into("<H" if width == 2 else "<I", raw, at, new)
        elif kind == "byte" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "delete":
            del raw[at : at + draw(st.integers(1, 32))]
        elif kind == "prefix":
            raw[:0] = draw(st.binary(min_size=1, max_size=64))
        else:
            raw += draw(st.binary(min_size=1, max_size=64))
    return bytes(raw)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
@given(data=mutated())
def test_fuzzed_archives_refused_or_read_as_torch_reads_them(tmp_path, torch_view, data):
    path = write(tmp_path, data, "fuzz.pt")
    assert_parity(path, torch_view)


# --------------------------------------------------------------------------- .npz: the same rules, and proportionate


def _npz(tmp_path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _npy_bytes(array) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_npz_deflate_bomb_refused_before_inflating(tmp_path):
    """80 MB of zeros deflate to 80 KB: far beyond budget.MAX_COMPRESSION_RATIO, and above the floor."""
    import numpy as np

    from bncli.loading import load_tensor

    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("x.npy", "w") as member:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (20_000_000,)})
        member.write(buf.getvalue())
        chunk = bytes(1 << 20)
        for _ in range(80):
            member.write(chunk)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(InputError, match=r"member 'x.npy' inflates .* KB to 83.9 MB \(more than 200x\): refused as a decompression bomb"):
        load_tensor(path)


def test_npz_member_whose_header_declares_more_than_it_holds(tmp_path):
    import numpy as np

    from bncli.loading import load_tensor

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**9,)})
    path = _npz(tmp_path, {"x.npy": buf.getvalue() + bytes(8)}, zipfile.ZIP_DEFLATED)
    with pytest.raises(InputError, match=r"member 'x.npy' declares an array of 8.0 GB but holds 136 bytes"):
        load_tensor(path)
    good = _npz(tmp_path, {"x.npy": _npy_bytes(np.arange(4.0))}, zipfile.ZIP_DEFLATED)  # and a sound one still loads
    tensor, key = load_tensor(good)
    assert key == "x" and tensor.tolist() == [0.0, 1.0, 2.0, 3.0]
