"""Files built to make bncli read other values than torch.load (the classes an attacker's review found): for each,
torch's values are taken in a child process, and bncli either reads the same values or refuses the file."""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from bncli.errors import InputError
from bncli.layers import find_layers, read_layer
from bncli.loading import load_checkpoint

POISON = [float("nan"), -1.0, -2.0, 0.0]

REFERENCE = r"""
import json, sys, warnings
import torch
warnings.simplefilter("ignore")
obj = torch.load(sys.argv[1], weights_only=False)
if isinstance(obj, torch.nn.Module):
    obj = {n + ("." if n else "") + "running_var": m.running_var for n, m in obj.named_modules() if hasattr(m, "running_var")}
elif "state_dict" in obj:
    obj = obj["state_dict"]
print(json.dumps({k: [repr(x) for x in v.tolist()] for k, v in obj.items() if k.endswith("running_var")}))
"""


def torch_sees(path: Path) -> dict[str, list[float]]:
    """running_var of every layer as torch.load(weights_only=False) gives it, in a child process."""
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # torch imports the test's own classes
    done = subprocess.run([sys.executable, "-c", REFERENCE, str(path)], capture_output=True, text=True, timeout=60,
                          check=True, env=env)
    return {k: [float(x) for x in v] for k, v in json.loads(done.stdout).items()}


def bncli_sees(path: Path) -> dict[str, list[float]]:
    ckpt = load_checkpoint(path)
    return {f"{k.name}.running_var": read_layer(ckpt, k).running_var.tolist() for k in find_layers(ckpt)}


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


def assert_same_or_refused(path: Path) -> str:
    """bncli reads every running_var as torch does, or refuses the file: 'same' or 'refused'."""
    reference = torch_sees(path)
    try:
        got = bncli_sees(path)
    except InputError:
        return "refused"
    assert set(got) == set(reference), (got, reference)
    for key in reference:
        assert _same(got[key], reference[key]), (key, got[key], reference[key])
    return "same"


def clean_bn(c: int = 4) -> OrderedDict:
    return OrderedDict([
        ("bn.weight", torch.ones(c)), ("bn.bias", torch.zeros(c)),
        ("bn.running_mean", torch.linspace(-0.5, 0.5, c)), ("bn.running_var", torch.linspace(0.5, 1.5, c)),
        ("bn.num_batches_tracked", torch.tensor(100)),
    ])  # fmt: skip


# --------------------------------------------------------------------------- tensors torch changes after rebuilding


class WithState:
    """A tensor pickled with Python state: torch.load setattr()s it, and `real` or `data` replace its values."""

    def __init__(self, t, state, parameter=False):
        self.t, self.state, self.parameter = t, state, parameter

    def __reduce_ex__(self, proto):
        storage = torch.storage.TypedStorage(wrap_storage=self.t.untyped_storage(), dtype=self.t.dtype, _internal=True)
        args = (storage, 0, tuple(self.t.shape), self.t.stride(), False, OrderedDict())
        if self.parameter:
            inner = WithState(self.t, None)
            return (torch._utils._rebuild_parameter_with_state, (inner, False, OrderedDict(), self.state))
        return (torch._tensor._rebuild_from_type_v2, (torch._utils._rebuild_tensor_v2, torch.Tensor, args, self.state))


class Constructed:
    """torch.FloatTensor([...]): a call torch allows even with weights_only=True."""

    def __init__(self, values):
        self.values = values

    def __reduce_ex__(self, proto):
        return (torch.FloatTensor, (self.values,))


@pytest.mark.parametrize(
    "value",
    [
        lambda t: WithState(t, {"real": float("nan")}),
        lambda t: WithState(t, {"data": torch.tensor(POISON)}),
        lambda t: WithState(t, {"real": -1e30}, parameter=True),
        lambda t: Constructed(POISON),
    ],
    ids=["state-real", "state-data", "parameter-state", "tensor-constructor"],
)
def test_tensors_torch_builds_otherwise_are_never_read_as_clean(tmp_path, value):
    sd = clean_bn()
    sd["bn.running_var"] = value(sd["bn.running_var"])
    path = tmp_path / "x.pt"
    torch.save(sd, path)
    assert not all(x >= 0 for x in torch_sees(path)["bn.running_var"])  # the file really is poisoned for torch
    assert assert_same_or_refused(path) == "refused"


# --------------------------------------------------------------------------- legacy storage keys

MAGIC = 0x1950A86A20F9469CFC6C


class _Storage:
    def __init__(self, key, numel, view=None):
        self.key, self.numel, self.view = key, numel, view


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce_ex__(self, proto):
        return (torch._utils._rebuild_tensor_v2, (*self.args, False, OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel, obj.view)
        return None


def write_legacy(path: Path, obj, keys, data: dict[str, list[float]]) -> Path:
    out = io.BytesIO()
    for header in (MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, out, protocol=2)
    _Pickler(out, protocol=2).dump(obj)
    pickle.dump(keys, out, protocol=2)
    for key in keys:
        out.write(struct.pack("<q", len(data[key])) + struct.pack(f"<{len(data[key])}f", *data[key]))
    path.write_bytes(out.getvalue())
    return path


@pytest.mark.parametrize("root_first", [True, False], ids=["view-key-is-a-storage", "storage-key-is-a-view"])
def test_legacy_storage_and_view_keys_share_one_table(tmp_path, root_first):
    clean = [0.1, -0.2, 0.3, 0.05, 0.5, 0.8, 1.2, 1.5]
    other = _Tensor(_Storage("V", 4), 0, (4,), (1,))
    view = _Tensor(_Storage("A", 8, ("V", 4, 4)), 0, (4,), (1,))
    items = [("head.scale", other), ("bn.running_var", view)] if root_first else [("bn.running_var", view), ("head.scale", other)]
    sd = OrderedDict([("bn.weight", _Tensor(_Storage("A", 8), 0, (4,), (1,))),
                      ("bn.running_mean", _Tensor(_Storage("A", 8), 0, (4,), (1,))), *items])
    path = write_legacy(tmp_path / "legacy.pt", sd, ["A", "V"], {"A": clean, "V": POISON})
    assert assert_same_or_refused(path) == "refused"


def test_legacy_views_read_as_torch_does(tmp_path):
    data = [0.1, -0.2, 0.3, 0.05, 0.5, 0.8, 1.2, 1.5]
    sd = OrderedDict([("bn.running_mean", _Tensor(_Storage("A", 8), 0, (4,), (1,))),
                      ("bn.running_var", _Tensor(_Storage("A", 8, ("W", 4, 4)), 0, (4,), (1,)))])
    path = write_legacy(tmp_path / "views.pt", sd, ["A"], {"A": data})
    assert assert_same_or_refused(path) == "same"


def test_a_tar_polyglot_is_refused(tmp_path):
    """torch tries its pre-2017 tar format first: a legacy stream whose first 512 bytes are also a valid tar header
    (the magic and version pickles in the name field, the system info a bytes value swallowing the rest) is
    read as the tar by torch.load(weights_only=False), as the pickle stream by a stream reader: refused."""
    import tarfile

    legacy = tmp_path / "plain.pt"
    torch.save(clean_bn(), legacy, _use_new_zipfile_serialization=False)
    raw = legacy.read_bytes()
    stream = io.BytesIO(raw)
    for _ in range(3):
        pickle.load(stream)
    rest = raw[stream.tell():]  # the object pickle, the key list, the storages
    prefix = pickle.dumps(MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
    info = tarfile.TarInfo("x")
    info.size = 0
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT)[:512])
    swallow = 512 - len(prefix) - 7
    header[: len(prefix) + 7] = prefix + b"\x80\x02B" + struct.pack("<I", swallow)
    header[148:156] = b"%06o\0 " % (256 + sum(header[:148]) + sum(header[156:]))
    polyglot = tmp_path / "poly.pt"
    polyglot.write_bytes(bytes(header) + b"." + rest)
    tarfile.TarInfo.frombuf(bytes(header), "utf-8", "surrogateescape")  # a valid tar header
    with pytest.raises(InputError, match="both a tar archive and a legacy torch pickle"):
        load_checkpoint(polyglot)
    assert list(load_checkpoint(legacy)) == list(clean_bn())  # a plain legacy file is not mistaken for a tar


# --------------------------------------------------------------------------- big-endian archives


def _big_endian(path: Path, swap) -> None:
    """Rewrite an archive as one written on a big-endian machine: byteorder 'big', storages swapped by swap()."""
    with zipfile.ZipFile(path) as zin:
        records = [(i.filename, zin.read(i)) for i in zin.infolist()]
    with zipfile.ZipFile(path, "w") as zout:
        for name, data in records:
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name and not name.endswith("serialization_id"):
                data = swap(data)
            zout.writestr(name, data)


class _UntypedV3:
    def __init__(self, raw):
        self.raw = raw

    def __reduce_ex__(self, proto):
        storage = torch.UntypedStorage.from_buffer(self.raw, dtype=torch.uint8)
        return (torch._utils._rebuild_tensor_v3, (storage, 0, (len(self.raw) // 4,), (1,), False, OrderedDict(), torch.float32))


def test_big_endian_archives_swap_by_the_storage_width(tmp_path):
    sd = clean_bn()
    del sd["bn.num_batches_tracked"]
    sd["bn.running_var"] = _UntypedV3(struct.pack(">4f", 1.0, 0.5, 0.8, 1.2))
    path = tmp_path / "be.pt"
    torch.save(sd, path)

    def swap(data: bytes) -> bytes:
        if data == struct.pack(">4f", 1.0, 0.5, 0.8, 1.2):
            return data  # the untyped storage: torch never swaps it
        return b"".join(data[i : i + 4][::-1] for i in range(0, len(data), 4))

    _big_endian(path, swap)
    reference = torch_sees(path)["bn.running_var"]
    assert reference != [1.0, 0.5, 0.8, 1.2]  # torch reads the untyped bytes natively
    assert assert_same_or_refused(path) == "same"


# --------------------------------------------------------------------------- whole models


def test_non_persistent_statistics_of_a_whole_model_are_audited(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    model[1].running_var.copy_(torch.tensor(POISON))
    model[1]._non_persistent_buffers_set = {"running_mean", "running_var"}
    path = tmp_path / "hidden.pt"
    torch.save(model, path)
    assert assert_same_or_refused(path) == "same"
    assert "1.running_var" in load_checkpoint(path)


def test_an_attribute_shadowing_a_buffer_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    model[1].__dict__["running_var"] = torch.tensor(POISON)  # found before _buffers by attribute lookup
    path = tmp_path / "shadow.pt"
    torch.save(model, path)
    assert torch_sees(path)["1.running_var"][1] == -1.0
    with pytest.raises(InputError, match="has an attribute that shadows its 'running_var'"):
        load_checkpoint(path)


def test_a_dict_subclass_state_dict_is_read_not_skipped(tmp_path):
    import collections

    poisoned = collections.defaultdict(list, clean_bn())
    poisoned["bn.running_var"] = torch.tensor(POISON)
    path = tmp_path / "dd.pt"
    torch.save({"state_dict": poisoned, "model_ema": clean_bn()}, path)
    assert load_checkpoint(path).provenance.container == "state_dict"
    assert assert_same_or_refused(path) == "same"


class _Module:
    def __init__(self, kids, params=None):
        self._parameters = OrderedDict(params or {})
        self._buffers = OrderedDict()
        self._modules = OrderedDict(kids)


def test_module_dags_cannot_multiply_keys_without_bound(tmp_path):
    one = torch.ones(1)
    node = _Module({})
    node._buffers.update(running_mean=torch.zeros(1), running_var=torch.ones(1))
    for _ in range(12):
        node = _Module({"a": node, "b": node}, {f"p{i}": one for i in range(100)})
    path = tmp_path / "dag.pt"
    torch.save(node, path)
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match="names more than"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- second review: what is odd is refused or read, never skipped


def _model(poisoned_var=None):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    if poisoned_var is not None:
        model[1].running_var.copy_(torch.tensor(poisoned_var))
    return model


def _save(tmp_path, obj, **kwargs) -> Path:
    path = tmp_path / "m.pt"
    torch.save(obj, path, **kwargs)
    return path


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda m: setattr(m, "_modules", OrderedDict([(0, m[0]), (1, m[1])])), "_modules that is not a mapping of names"),
        (lambda m: m[1]._parameters.__setitem__("running_var", torch.nn.Parameter(torch.tensor(POISON))), "shadows its 'running_var'"),
        (lambda m: setattr(m[1], "eps", float("nan")), "has eps nan"),
        (lambda m: setattr(m[1], "eps", -1.0), "has eps -1.0"),
        (lambda m: setattr(m[1], "eps", "x"), "has eps 'x'"),
        (lambda m: setattr(m[1], "eps", 10**400), "beyond any float"),
        (lambda m: setattr(m[1], "momentum", 10**400), "beyond any float"),
    ],
    ids=["int-module-key", "parameter-and-buffer", "eps-nan", "eps-negative", "eps-text", "eps-huge", "momentum-huge"],
)
def test_whole_models_torch_would_run_differently_are_refused(tmp_path, tamper, message):
    model = _model()
    tamper(model)
    with pytest.raises(InputError, match=message):
        load_checkpoint(_save(tmp_path, model))


def test_every_buffer_of_a_whole_model_is_audited(tmp_path):
    """A non-persistent weight buffer (FrozenBatchNorm2d keeps weight as a buffer): the model runs with it."""

    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.tensor([float("nan"), -1e30, 0.0, 1e30]), persistent=False)
            self.register_buffer("bias", torch.zeros(4))
            self.register_buffer("running_mean", torch.zeros(4))
            self.register_buffer("running_var", torch.ones(4))

    globals()["Frozen"] = Frozen  # picklable by name, as a model class of the user's would be
    Frozen.__qualname__ = "Frozen"
    from bncli.audit import inspect_file

    report = inspect_file(_save(tmp_path, torch.nn.Sequential(Frozen())))
    assert any(f.rule == "BN001" and "weight" in f.message for f in report.findings)


class _Init:
    def __reduce_ex__(self, proto):
        return (torch.nn.init.constant_, (torch.empty(4), float("nan")))


@pytest.mark.parametrize("whole", [False, True], ids=["state-dict", "whole-model"])
def test_a_call_where_a_tensor_belongs_is_unreadable_not_absent(tmp_path, whole):
    if whole:
        model = _model()
        model[1]._buffers["running_var"] = _Init()
        path = _save(tmp_path, model)
    else:
        sd = clean_bn()
        sd["bn.running_var"] = _Init()
        path = _save(tmp_path, sd)
    assert all(math.isnan(x) for x in next(iter(torch_sees(path).values())))
    with pytest.raises(InputError, match=r"a value built by torch\.nn\.init\.constant_\(\), whose values bncli does not read"):
        bncli_sees(path)


class MyStateDict(OrderedDict):
    """A dict subclass of the user's: protocol 1 pickles it through copyreg._reconstructor."""


@pytest.mark.parametrize("protocol", [1, 2])
def test_a_dict_subclass_under_a_container_key_is_read(tmp_path, protocol):
    poisoned = MyStateDict(clean_bn())
    poisoned["bn.running_var"] = torch.tensor(POISON)
    path = _save(tmp_path, {"state_dict": poisoned, "model_ema": clean_bn()}, pickle_protocol=protocol)
    assert load_checkpoint(path).provenance.container == "state_dict"
    assert assert_same_or_refused(path) == "same"


def test_an_unreadable_container_ahead_of_the_chosen_one_is_refused(tmp_path):
    import argparse

    path = _save(tmp_path, {"state_dict": argparse.Namespace(x=1), "model_ema": clean_bn()})
    with pytest.raises(InputError, match="'state_dict' holds a pickled argparse.Namespace, which bncli cannot read"):
        load_checkpoint(path)
    assert load_checkpoint(path, state="model_ema").provenance.container == "model_ema"
