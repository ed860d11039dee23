"""bncli's safetensors header checks against the safetensors library (in a child process): for odd and hostile
headers bncli either refuses, or reads exactly the tensors (names, dtypes, shapes, bytes) the library reads; and a
header of a million entries is refused at the entry limit, before a million objects exist."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bncli import budget
from bncli.errors import InputError
from bncli.formats.safetensors import SAFETENSORS_DTYPES, check_safetensors

EXAMPLES = int(os.environ.get("BNCLI_FUZZ_EXAMPLES", "40"))

SERVER = r"""
import json, sys, zlib
import torch
from safetensors import safe_open

def first(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        out = {}
        with safe_open(path, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                out[name] = [str(t.dtype).removeprefix("torch."), list(t.shape), zlib.crc32(raw)]
        print(json.dumps({"tensors": out}), flush=True)
    except Exception as exc:
        print(json.dumps({"error": first(exc)}), flush=True)
"""


@pytest.fixture(scope="module")
def library():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(path: Path) -> dict:
        nonlocal proc
        if proc.poll() is not None:
            proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        proc.stdin.write(f"{path}\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        return json.loads(line) if line else {"error": "crashed"}

    yield read
    proc.stdin.close()
    proc.wait(timeout=30)


def st_file(tmp_path: Path, header: str | bytes, payload: bytes = b"", name: str = "t.safetensors") -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


def bncli_tensors(path: Path) -> dict | str:
    try:
        entries = check_safetensors(path)
    except InputError as exc:
        return exc.message
    raw = path.read_bytes()
    return {
        name: [SAFETENSORS_DTYPES[e.dtype][0], list(e.shape), zlib.crc32(raw[e.start : e.end])] for name, e in entries.items()
    }


def assert_parity(path: Path, library) -> dict | str:
    ours = bncli_tensors(path)
    if isinstance(ours, str):
        assert "\n" not in ours and ours.startswith(str(path))
        return ours
    theirs = library(path)
    assert "error" not in theirs, f"bncli accepted a file the safetensors library refuses: {theirs['error']}"
    assert ours == theirs["tensors"]
    return ours


F32_2 = struct.pack("<2f", 1.5, -2.0)
E = '"dtype":"F32","shape":[2],"data_offsets":[0,8]'

ODD_HEADERS = {
    # accepted by both, the same values
    "plain": ('{"a":{' + E + "}}", F32_2, None),
    "space-padded": ('{"a":{' + E + "}}" + " " * 7, F32_2, None),
    "metadata": ('{"__metadata__":{"format":"pt","x":""},"a":{' + E + "}}", F32_2, None),
    "metadata-empty": ('{"__metadata__":{},"a":{' + E + "}}", F32_2, None),
    "metadata-last": ('{"a":{' + E + '},"__metadata__":{"k":"v"}}', F32_2, None),
    "zero-size-first": ('{"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{' + E + "}}", F32_2, None),
    "zero-size-last": ('{"a":{' + E + '},"z":{"dtype":"F16","shape":[3,0],"data_offsets":[8,8]}}', F32_2, None),
    "only-zero-size": ('{"z":{"dtype":"I64","shape":[0],"data_offsets":[0,0]}}', b"", None),
    "scalar": ('{"s":{"dtype":"I32","shape":[],"data_offsets":[0,4]}}', struct.pack("<i", -7), None),
    "out-of-order": ('{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],'
                     '"data_offsets":[0,4]}}', F32_2, None),
    "unknown-field": ('{"a":{' + E + ',"extra":[1,2]}}', F32_2, None),
    "unicode-name": ('{"caf\\u00e9.\u2603":{' + E + "}}", F32_2, None),
    "no-tensors": ("{}", b"", None),
    "bf16-and-bool": ('{"h":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BOOL","shape":[4],'
                      '"data_offsets":[4,8]}}', b"\x80\x3f\x00\xc0\x01\x00\x01\x00", None),
    # refused by bncli, each with its reason
    "duplicate-tensor": ('{"a":{' + E + '},"a":{' + E + "}}", F32_2, "appears twice"),
    "duplicate-field": ('{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32_2, "appears twice"),
    "duplicate-metadata": ('{"__metadata__":{},"__metadata__":{},"a":{' + E + "}}", F32_2, "appears twice"),
    "metadata-null": ('{"__metadata__":null,"a":{' + E + "}}", F32_2, "__metadata__ must map strings to strings"),
    "metadata-number": ('{"__metadata__":{"a":1},"a":{' + E + "}}", F32_2, "__metadata__ must map strings to strings"),
    "metadata-list": ('{"__metadata__":[],"a":{' + E + "}}", F32_2, "__metadata__ must map strings to strings"),
    "leading-space": (' {"a":{' + E + "}}", F32_2, "does not start with '{'"),
    "trailing-garbage": ('{"a":{' + E + "}}x", F32_2, "not valid JSON"),
    "gap": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', F32_2, "a gap of 4 bytes"),
    "overlap": ('{"a":{' + E + '},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', F32_2, "overlaps"),
    "past-the-end": ('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', F32_2, "ends at byte"),
    "bytes-after": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F32_2, "4 bytes after the last tensor"),
    "reversed-offsets": ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}', F32_2, "data_offsets"),
    "negative-dim": ('{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', F32_2, "has shape"),
    "float-dim": ('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', F32_2, "has shape"),
    "bool-dim": ('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,8]}}', F32_2, "has shape"),
    "overflowing-shape": ('{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', b"", "too large"),
    "huge-offset": ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[18446744073709551616,18446744073709551616]}}', b"",
                    "a gap of 18446744073709551616 bytes"),
    "wrong-size": ('{"a":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}}', F32_2, "needs 16 bytes"),
    "unknown-dtype": ('{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,8]}}', F32_2, "unknown dtype"),
    "lone-surrogate": ('{"\\ud800":{' + E + "}}", F32_2, "not valid Unicode"),
    "nan-dim": ('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', F32_2, "has shape"),
    "not-an-object": ("[1,2]", b"", "does not start with '{'"),
    "entry-not-object": ('{"a":[1]}', b"", "is not an object"),
}


@pytest.mark.parametrize("case", list(ODD_HEADERS))
def test_odd_headers_read_as_the_library_reads_them_or_refused(tmp_path, library, case):
    header, payload, refusal = ODD_HEADERS[case]
    path = st_file(tmp_path, header, payload)
    ours = assert_parity(path, library)
    if refusal is None:
        assert isinstance(ours, dict), ours
    else:
        assert isinstance(ours, str), f"accepted: {ours}"
        assert refusal in ours


def _many_entries(count: int) -> str:
    return "{" + ",".join(f'"l{i:07d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(count)) + "}"


def test_a_header_of_a_million_empty_entries_is_refused_at_the_limit(tmp_path, monkeypatch):
    """1.3 M empty entries in a 94 MB header: refused after MAX_ENTRIES + 1 of them, the rest never built or checked."""
    import bncli.formats.safetensors

    path = st_file(tmp_path, _many_entries(1_300_000))
    built = []
    real_entry = bncli.formats.safetensors._entry
    monkeypatch.setattr(bncli.formats.safetensors, "_entry", lambda *args: built.append(1) or real_entry(*args))
    monkeypatch.setattr(budget, "MAX_ENTRIES", 1000)  # the default (200,000) behaves the same, ten times slower
    with pytest.raises(InputError) as info:
        check_safetensors(path)
    assert info.value.message == f"{path}: its safetensors header holds 1,001 entries, above the limit of 1,000"
    assert len(built) == 1000


def test_metadata_entries_count_too(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "MAX_ENTRIES", 3)
    path = st_file(tmp_path, '{"__metadata__":{"a":"1","b":"2","c":"3","d":"4"}}')
    with pytest.raises(InputError, match="its safetensors __metadata__ holds 4 entries, above the limit of 3"):
        check_safetensors(path)
    ok = st_file(tmp_path, '{"__metadata__":{"a":"1"},"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x07", "ok.st")
    assert list(check_safetensors(ok)) == ["x"]


# --------------------------------------------------------------------------- fuzz: generated headers


_dims = st.lists(st.integers(0, 3), max_size=3)


@st.composite
def headers(draw):
    """Headers whose entries may be out of order, zero-size, gapped, overlapping or mis-sized."""
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "bn.running_var", "__metadata__", "é"]), max_size=5))
    entries = []
    offset = 0
    for name in names:
        if name == "__metadata__":
            entries.append((name, draw(st.sampled_from(['{}', '{"k":"v"}', "null", '{"k":1}']))))
            continue
        code = draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL"]))
        shape = draw(_dims)
        n = SAFETENSORS_DTYPES[code][1]
        for d in shape:
            n *= d
        start = offset + draw(st.sampled_from([0, 0, 0, 1, -1]))
        end = start + n + draw(st.sampled_from([0, 0, 0, 1]))
        offset = max(offset, end)
        entries.append((name, json.dumps({"dtype": code, "shape": shape, "data_offsets": [start, end]})))
    draw(st.randoms()).shuffle(entries)
    text = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in entries) + "}"
    payload = bytes(draw(st.integers(0, 255)) for _ in range(max(offset, 0) + draw(st.sampled_from([0, 0, 1]))))
    return text, payload


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=headers())
def test_generated_headers_read_as_the_library_reads_them_or_refused(tmp_path, library, case):
    text, payload = case
    assert_parity(st_file(tmp_path, text, payload), library)
