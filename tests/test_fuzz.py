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
