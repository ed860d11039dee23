"""Property test: truncated, bit-flipped and spliced checkpoints raise only bncli's own errors, never anything else.

CI runs a few examples per format. For a longer run:  BNCLI_FUZZ_EXAMPLES=5000 python3 -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from badfiles import eocd, fix_crc, record, relocate
from conftest import bn_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from bncli.errors import BncliError, InputError
from bncli.layers import find_layers, read_layer
from bncli.loading import load_checkpoint, load_tensor

EXAMPLES = int(os.environ.get("BNCLI_FUZZ_EXAMPLES", "40"))


def _torch_bytes(legacy: bool) -> bytes:
    buf = io.BytesIO()
    sd = bn_state(3)
    sd.update(bn_state(2, prefix="head.bn", seed=1))
    torch.save(sd, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


SEEDS = {
    "zip": _torch_bytes(legacy=False),
    "legacy": _torch_bytes(legacy=True),
    "safetensors": save({k: v.float() if v.is_floating_point() else v for k, v in bn_state(3).items()}),
}


@st.composite
def damaged(draw, seed: bytes):
    """One of: cut the file short, flip bits, overwrite a span with other bytes, or splice in a span of the file itself."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "splice"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        else:
            src = draw(st.integers(0, len(seed) - 1))
            length = draw(st.integers(1, 64))
            data[at:at] = seed[src : src + length]
    return bytes(data)


@st.composite
def lying_pickle(draw):
    """Damage only data.pkl inside a zip checkpoint, then fix its CRC: the archive is sound, the pickle lies."""
    seed = SEEDS["zip"]
    _, r = record(seed, "data.pkl")
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        at = r["data"] + draw(st.integers(0, r["size"] - 1))
        if draw(st.booleans()):
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            data[at] = draw(st.integers(0, 255))
    return bytes(fix_crc(data, "data.pkl"))


def _exercise(data: bytes) -> None:
    """Load as a checkpoint, read every layer, load as a tensor: any failure must be a BncliError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed"
        path.write_bytes(data)
        try:
            ckpt = load_checkpoint(path)
            for keys in find_layers(ckpt):
                read_layer(ckpt, keys)
        except BncliError:
            pass
        try:
            load_tensor(path, key="bn.running_var")
        except BncliError:
            pass


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_damaged_files_raise_only_bncli_errors(fmt):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 40, suppress_health_check=list(HealthCheck))
    @given(damaged(SEEDS[fmt]))
    def run(data):
        _exercise(data)

    run()


def test_lying_pickles_raise_only_bncli_errors():
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 40, suppress_health_check=list(HealthCheck))
    @given(lying_pickle())
    def run(data):
        _exercise(data)

    run()


@st.composite
def odd_layout(draw):
    """A sound torch.save archive placed oddly: after a prefix (offsets relocated or not), before appended data, or
    as the second of two concatenated archives. Python's zipfile reads most of these; torch's reader would not."""
    seed = SEEDS["zip"]
    kind = draw(st.sampled_from(["prefix", "prefix-relocated", "append", "concatenated", "concatenated-relocated"]))
    junk = draw(st.binary(min_size=1, max_size=200))
    if kind == "prefix":
        return junk + seed
    if kind == "prefix-relocated":
        return junk + relocate_zip64(seed, len(junk))
    if kind == "append":
        return seed + junk
    if kind == "concatenated":
        return seed + seed
    return seed + relocate_zip64(seed, len(seed))


def relocate_zip64(data: bytes, by: int) -> bytes:
    """Every offset of a torch.save archive (which always writes zip64 end records) moved by `by`."""
    out = bytearray(relocate(data, by))
    loc = eocd(data) - 20
    (z_offset,) = struct.unpack_from("<Q", out, loc + 8)
    struct.pack_into("<Q", out, loc + 8, z_offset + by)
    (cd_offset,) = struct.unpack_from("<Q", out, z_offset + 48)
    struct.pack_into("<Q", out, z_offset + 48, cd_offset + by)
    return bytes(out)


def test_prefixed_and_concatenated_archives_are_refused():
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 40, suppress_health_check=list(HealthCheck))
    @given(odd_layout())
    def run(data):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "odd.pt"
            path.write_bytes(data)
            with pytest.raises(InputError):
                load_checkpoint(path)

    run()


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_seed_files_are_valid(fmt):
    """The seeds themselves load, so the fuzzing starts from real files and not from garbage."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed"
        path.write_bytes(SEEDS[fmt])
        ckpt = load_checkpoint(path)
        assert [k.name for k in find_layers(ckpt)] == (["bn"] if fmt == "safetensors" else ["bn", "head.bn"])


# --------------------------------------------------------------------------- hostile pickles (issue 9's shapes)


def _s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


_GLOBALS = ["posix system", "builtins getattr", "torch FloatStorage", "collections OrderedDict", "__builtin__ bytearray",
            "torch._utils _rebuild_tensor_v2", "builtins set", "copyreg _reconstructor", "torch.nn.modules.batchnorm BatchNorm2d"]


@st.composite
def piece(draw, depth: int = 0) -> bytes:
    """Pickle bytes that push one value (or try to): atoms, memo DAGs, calls on globals, BUILD, allocations, cycles,
    nested keys, stride-0 views of a real storage, containers of pieces."""
    kinds = ["atom", "dag", "call", "build", "alloc", "cycle", "nested-key", "view", "newobj", "get"]
    if depth < 3:
        kinds.append("list")
    kind = draw(st.sampled_from(kinds))
    memo = draw(st.integers(0, 255))
    if kind == "atom":
        return draw(st.sampled_from([b"K\x05", b"N", b"\x88", _s("bn.running_var"), b"G\x7f\xf8\x00\x00\x00\x00\x00\x00"]))
    if kind == "dag":
        out = b")q" + bytes([memo])
        for _ in range(draw(st.integers(1, 80))):
            out += b"h" + bytes([memo]) + b"h" + bytes([memo]) + b"\x86q" + bytes([memo])
        return out
    if kind == "get":
        return b"h" + bytes([memo])  # may refer to nothing
    if kind in ("call", "newobj", "build"):
        module, name = draw(st.sampled_from(_GLOBALS)).split()
        head = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        args = b"(" + b"".join(draw(st.lists(piece(depth + 1), max_size=3))) + b"t"
        if kind == "call":
            return head + args + b"R"
        if kind == "newobj":
            return head + args + b"\x81"
        return head + b"}" + _s("dtype") + _s("bfloat16") + b"sb"
    if kind == "alloc":
        n = draw(st.sampled_from([0, 1, 1 << 20, (1 << 31) - 1]))
        return b"c__builtin__\nbytearray\nJ" + n.to_bytes(4, "little") + b"\x85R"
    if kind == "cycle":
        return b"]q" + bytes([memo]) + b"h" + bytes([memo]) + b"a"
    if kind == "nested-key":
        return b"}((K\x01\x85\x85K\x02s"
    if kind == "view":
        numel = draw(st.sampled_from([1, 3, 10**9]))
        stride = draw(st.sampled_from([0, 1]))
        pid = b"(" + _s("storage") + b"ctorch\nFloatStorage\n" + _s("0") + _s("cpu") + b"K\x03tQ"
        return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"K\x00J" + numel.to_bytes(4, "little") + b"\x85K"
                + bytes([stride]) + b"\x85\x89ccollections\nOrderedDict\n)RtR")
    items = b"".join(draw(st.lists(piece(depth + 1), max_size=4)))
    return b"(" + items + b"l"


@st.composite
def hostile_pickle(draw) -> bytes:
    body = b"".join(draw(st.lists(piece(), min_size=1, max_size=6)))
    return b"\x80\x02(" + body + b"l."


def _in_zip(pkl: bytes) -> bytes:
    seed = SEEDS["zip"]
    _, r = record(seed, "data.pkl")
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(seed)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else zin.read(info))
    return out.getvalue()


def _in_legacy(pkl: bytes) -> bytes:
    import pickle

    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}))
    return head + pkl + pickle.dumps([], protocol=2)


@pytest.mark.parametrize("form", ["zip", "legacy"])
def test_hostile_pickles_stay_within_budget(form):
    """Every generated pickle (memo DAGs, BUILD on globals, allocations, cycles, stride-0 views, calls): only
    bncli's own errors, and within 10 s and 600 MB each."""
    import resource
    import time

    wrap = _in_zip if form == "zip" else _in_legacy

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 40, suppress_health_check=list(HealthCheck))
    @given(hostile_pickle())
    def run(pkl):
        start = time.monotonic()
        _exercise(wrap(pkl))
        assert time.monotonic() - start < 10
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 600_000 + BASELINE_KB

    BASELINE_KB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
