"""Every format, every wrapping: checkpoints load by content, state dicts are found and prefixes stripped and reported."""

from __future__ import annotations

import os
import tracemalloc
from collections import OrderedDict

import numpy as np
import pytest
import torch
from badfiles import declare_size, edit_pickle, record, set_method
from conftest import bn_state
from safetensors.torch import save_file

from bncli.audit import inspect_file
from bncli.errors import InputError
from bncli.layers import find_layers, read_layer
from bncli.loading import CONTAINER_KEYS, load_checkpoint, load_tensor, sniff


def _save(obj, path, how):
    if how == "zip":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        save_file(obj, str(path))
    return path


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("how,fmt", [("zip", "torch-zip"), ("legacy", "torch-legacy"), ("st", "safetensors")])
@pytest.mark.parametrize("name", ["model.pt", "model", "weights.txt", "model.safetensors.bak"])
def test_format_by_content_not_name(tmp_path, how, fmt, name):
    sd = bn_state(5)
    path = _save(sd, tmp_path / name, how)
    assert sniff(path) == fmt
    ckpt = load_checkpoint(path)
    assert ckpt.provenance.format == fmt
    # torch keeps insertion order; safetensors writers order tensors by dtype then name, and bncli keeps file order
    assert list(ckpt) == list(sd) if how != "st" else sorted(ckpt) == sorted(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(ckpt.read(key), value.numpy())


@pytest.mark.parametrize("how", ["zip", "legacy", "st"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_reported_as_stored_and_computed_wider(tmp_path, how, dtype):
    sd = OrderedDict((k, v.to(dtype) if v.is_floating_point() else v) for k, v in bn_state(6, seed=3).items())
    sd["bn.running_var"][2] = 1e-6  # below eps, and a subnormal in float16: must survive the widening exactly
    ckpt = load_checkpoint(_save(sd, tmp_path / "m.pt", how))
    layer = read_layer(ckpt, find_layers(ckpt)[0])
    name = str(dtype).removeprefix("torch.")
    assert ckpt.dtype("bn.running_var") == layer.dtype == name
    assert layer.running_var.dtype in (np.float32, np.float64)  # widened, never float16
    np.testing.assert_array_equal(layer.running_var.astype(np.float64), sd["bn.running_var"].double().numpy())
    report = inspect_file(ckpt.provenance.path)
    ref = sd["bn.running_var"].double().numpy()
    assert report.layers[0].dtype == name
    assert report.layers[0].running_var.center == float(np.median(ref))
    # 1e-6 is below float16's smallest normal (6.1e-5), not bfloat16's: BN009 tells them apart
    expected = ["collapsed-variance"] + (["low-precision-statistics"] if dtype == torch.float16 else []) + ["fold-risk"]
    assert [f.name for f in report.findings] == expected


def test_sample_safetensors_matches_sample_pt():
    from conftest import SAMPLES

    a, b = load_checkpoint(SAMPLES / "model.pt"), load_checkpoint(SAMPLES / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a.read(key), b.read(key))


# --------------------------------------------------------------------------- wrappings


@pytest.mark.parametrize("key", CONTAINER_KEYS)
def test_every_container_key(make_ckpt, key):
    ckpt = load_checkpoint(make_ckpt({key: bn_state(), "epoch": 7, "arch": "net"}))
    assert ckpt.provenance.container == key
    assert ckpt.provenance.alternatives == ()
    assert list(ckpt) == list(bn_state())


def test_model_and_ema_main_is_chosen_others_noted(make_ckpt):
    path = make_ckpt({"model": bn_state(seed=1), "model_ema": bn_state(seed=2), "optimizer": {"lr": 0.1}})
    main = load_checkpoint(path)
    assert (main.provenance.container, main.provenance.alternatives) == ("model", ("model_ema",))
    np.testing.assert_array_equal(main.read("bn.running_var"), bn_state(seed=1)["bn.running_var"].numpy())
    ema = load_checkpoint(path, state="model_ema")
    assert (ema.provenance.container, ema.provenance.alternatives) == ("model_ema", ("model",))
    np.testing.assert_array_equal(ema.read("bn.running_var"), bn_state(seed=2)["bn.running_var"].numpy())


def test_timm_style_state_dict_and_ema(make_ckpt):
    path = make_ckpt({"state_dict": bn_state(seed=1), "state_dict_ema": bn_state(seed=2), "epoch": 3})
    prov = load_checkpoint(path).provenance
    assert (prov.container, prov.alternatives) == ("state_dict", ("state_dict_ema",))


def test_nested_container_and_dotted_state(make_ckpt):
    path = make_ckpt({"model": {"state_dict": bn_state(seed=1), "ema": bn_state(seed=2)}, "step": 10})
    prov = load_checkpoint(path).provenance
    assert (prov.container, prov.alternatives) == ("model.state_dict", ("model.ema",))
    ckpt = load_checkpoint(path, state="model.ema")
    np.testing.assert_array_equal(ckpt.read("bn.running_mean"), bn_state(seed=2)["bn.running_mean"].numpy())


def test_unknown_state_key_lists_what_exists(make_ckpt):
    path = make_ckpt({"model": bn_state(), "model_ema": bn_state()})
    with pytest.raises(InputError) as info:
        load_checkpoint(path, state="ema")
    assert info.value.message == (
        f"{path}: no key 'ema' in the checkpoint; top-level keys: model, model_ema; state dicts found: model, model_ema"
    )


def test_no_container_suggests_state(make_ckpt):
    path = make_ckpt({"generator": bn_state(), "discriminator": bn_state(), "epoch": 1})
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message == (
        f"{path}: no state dict of tensors found; top-level keys: generator, discriminator, epoch; "
        "choose one with --state: generator, discriminator"
    )
    assert load_checkpoint(path, state="discriminator").provenance.container == "discriminator"


def _lightning(prefix: str = "model.") -> dict:
    sd = OrderedDict((prefix + k, v) for k, v in bn_state(4).items())
    return {
        "epoch": 2,
        "global_step": 40,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "loops": {"fit_loop": {"state_dict": {}}},
        # Tensors outside the state dict that look like BatchNorm buffers: they must not be reported as layers.
        "callbacks": {"EMA": {"shadow.bn.running_mean": torch.zeros(4), "shadow.bn.running_var": torch.ones(4)}},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1},
    }


def test_lightning_checkpoint(make_ckpt):
    path = make_ckpt(_lightning(), "last.ckpt")
    ckpt = load_checkpoint(path)
    assert (ckpt.provenance.container, ckpt.provenance.prefix) == ("state_dict", None)
    assert [layer.name for layer in find_layers(ckpt)] == ["model.bn"]
    stripped = load_checkpoint(path, strip_prefix="model.")
    assert stripped.provenance.prefix == "model."
    assert [layer.name for layer in find_layers(stripped)] == ["bn"]


def test_lightning_cli_strip_prefix(cli, make_ckpt):
    path = make_ckpt(_lightning(), "last.ckpt")
    result = cli("inspect", path, "--strip-prefix", "model", "--format", "json")
    assert result.exit_code == 0, result
    assert '"name": "bn"' in result.stdout and '"prefix": "model."' in result.stdout


@pytest.mark.parametrize(
    "prefix,reported",
    [("module.", "module."), ("_orig_mod.", "_orig_mod."), ("_orig_mod.module.", "_orig_mod.module."), ("", None)],
)
def test_wrapper_prefixes_stripped_and_reported(make_ckpt, prefix, reported):
    sd = OrderedDict((prefix + k, v) for k, v in bn_state().items())
    ckpt = load_checkpoint(make_ckpt({"state_dict": sd}))
    assert ckpt.provenance.prefix == reported
    assert list(ckpt) == list(bn_state())


def test_strip_prefix_combines_with_wrappers(make_ckpt):
    sd = OrderedDict(("module.net." + k, v) for k, v in bn_state().items())
    ckpt = load_checkpoint(make_ckpt(sd), strip_prefix="net.")
    assert (ckpt.provenance.prefix, list(ckpt)) == ("module.net.", list(bn_state()))


def test_strip_prefix_must_be_shared(make_ckpt):
    sd = OrderedDict(("model." + k, v) for k, v in bn_state().items())
    sd["criterion.pos_weight"] = torch.ones(1)
    path = make_ckpt(sd)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, strip_prefix="model.")
    assert info.value.message == (
        f"{path}: cannot strip prefix 'model.': only 5 of 6 keys start with it (not 'criterion.pos_weight')"
    )


# --------------------------------------------------------------------------- layers of every kind


@pytest.mark.parametrize("nbt", ["0-d", "1-element", "python int", "missing"])
def test_num_batches_tracked_forms(make_ckpt, nbt):
    sd = bn_state()
    value = {"0-d": torch.tensor(42), "1-element": torch.tensor([42]), "python int": 42, "missing": None}[nbt]
    if value is None:
        del sd["bn.num_batches_tracked"]
    else:
        sd["bn.num_batches_tracked"] = value
    ckpt = load_checkpoint(make_ckpt(sd))
    assert read_layer(ckpt, find_layers(ckpt)[0]).num_batches_tracked == (None if value is None else 42)


def test_batchnorm_1d_3d_and_sync_inspected_alike(make_ckpt):
    net = torch.nn.ModuleDict({"a": torch.nn.BatchNorm1d(5), "b": torch.nn.BatchNorm3d(6), "c": torch.nn.SyncBatchNorm(7)})
    torch.manual_seed(0)
    net["a"](torch.randn(8, 5) * 3 + 1)
    net["b"](torch.randn(4, 6, 2, 3, 3) * 2 - 1)
    with torch.no_grad():  # SyncBatchNorm cannot run a training step on CPU; give it trained-looking statistics
        net["c"].running_mean.copy_(torch.randn(7))
        net["c"].running_var.copy_(torch.rand(7) + 0.5)
        net["c"].num_batches_tracked.fill_(1)  # as the others: uneven counts are BN016
        for module in net.values():  # trained-looking affine parameters too, or BN010 (untrained-affine) fires
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.1, 0.1)
    report = inspect_file(make_ckpt(net.state_dict()))
    assert [(layer.name, layer.num_features) for layer in report.layers] == [("a", 5), ("b", 6), ("c", 7)]
    for layer in report.layers:
        ref = getattr(net, layer.name).running_var.double().numpy()
        assert layer.running_var.center == float(np.median(ref))
        assert layer.num_batches_tracked == getattr(net, layer.name).num_batches_tracked.item()
    assert report.findings == ()


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_load_tensor_safetensors_keeps_dtype(tmp_path, dtype):
    x = torch.randn(2, 3, 4, 4).to(dtype)
    save_file({"x": x}, str(tmp_path / "x"))
    y, key = load_tensor(tmp_path / "x")
    assert key == "x" and y.dtype == dtype
    assert torch.equal(y, x)


def test_load_tensor_npz_and_npy(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    np.save(tmp_path / "a.npy", x)
    np.savez_compressed(tmp_path / "b.npz", images=x)
    assert torch.equal(load_tensor(tmp_path / "a.npy")[0], torch.from_numpy(x))
    t, key = load_tensor(tmp_path / "b.npz")
    assert key == "images" and torch.equal(t, torch.from_numpy(x))


# --------------------------------------------------------------------------- zip checks happen before torch


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail the test if torch.load is reached: the structural checks must refuse the file first."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be called on this file")

    monkeypatch.setattr(torch, "load", refuse)


def test_small_file_declaring_gigabytes_refused_cheaply(tmp_path, no_torch_load):
    good = tmp_path / "good.pt"
    torch.save({"bn.running_var": torch.ones(750_000)}, good)  # a 3 MB file
    path = tmp_path / "liar.pt"
    path.write_bytes(declare_size(good.read_bytes(), "data/0", 0xF000_0000))  # claims 4 GB
    tracemalloc.start()
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    name, _ = record(good.read_bytes(), "data/0")
    assert info.value.message == f"{path}: truncated or corrupt: record {name!r} declares 4.0 GB but the file has only 3.0 MB"
    assert peak < 2_000_000  # the file's 3 MB were never read into memory, let alone 4 GB


def test_pickle_declaring_more_than_its_record_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(OrderedDict(bn_state(4)), good)
    path = tmp_path / "liar.pt"
    # the first storage (weight, 4 floats) now claims 255 elements: mapped, its tensor would read its neighbours' bytes
    path.write_bytes(edit_pickle(good.read_bytes(), b"cpuq\x07K\x04t", b"cpuq\x07K\xfft"))
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    name, _ = record(good.read_bytes(), "data/0")
    assert info.value.message == (
        f"{path}: corrupt torch archive: the pickle declares 1.0 KB for record {name!r}, which holds 16 bytes"
    )


def test_compressed_record_refused(tmp_path, no_torch_load):
    good = tmp_path / "good.pt"
    torch.save(bn_state(), good)
    path = tmp_path / "deflated.pt"
    path.write_bytes(set_method(good.read_bytes(), "data/1", 8))
    name, _ = record(good.read_bytes(), "data/1")
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message == (
        f"{path}: record {name!r} is compressed; torch stores records uncompressed, "
        "so this archive was not written by torch.save (or was re-zipped)"
    )


def _flipped_bit(tmp_path):
    """A torch.save archive with one bit flipped in a tensor record; returns its path and the record's name."""
    good = tmp_path / "good.pt"
    torch.save(bn_state(), good)
    data = bytearray(good.read_bytes())
    name, r = record(bytes(data), "data/2")
    data[r["data"] + 1] ^= 0x10
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    return path, name


def test_flipped_bit_in_tensor_data_caught_by_crc(tmp_path, no_torch_load):
    path, name = _flipped_bit(tmp_path)
    with pytest.raises(InputError) as info:
        ckpt = load_checkpoint(path)  # the torch-free reader checks a record's CRC when it reads it
        [ckpt.read(key) for key in ckpt]
    assert info.value.message == f"{path}: corrupt: record {name!r} fails its CRC-32 check (the file is damaged)"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sparse_and_quantized_tensors_keep_the_fast_path(make_ckpt, monkeypatch):
    """One exotic tensor anywhere: the file is still read lazily, only the BatchNorm bytes; the exotic tensor is a
    tensor of the state dict whose values bncli says it does not read."""
    sd = bn_state(4)
    sd["extra.sparse"] = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (3,))
    sd["extra.q"] = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8)
    path = make_ckpt(sd)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    ckpt = load_checkpoint(path)
    assert "extra.sparse" in ckpt and "extra.q" in ckpt
    np.testing.assert_array_equal(ckpt.read("bn.running_var"), sd["bn.running_var"].numpy())
    with pytest.raises(InputError, match="a quantized tensor, whose values bncli does not read"):
        ckpt.read("extra.q")


def test_legacy_storage_size_lie(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(bn_state(4), good, _use_new_zipfile_serialization=False)
    raw = bytearray(good.read_bytes())
    # The first storage's 8-byte element count sits right after the pickles; claim 5 elements instead of 4.
    at = raw.index(b"\x04\x00\x00\x00\x00\x00\x00\x00", len(raw) - 5 * 8 - 4 * 4 * 4 - 8)
    raw[at] = 5
    path = tmp_path / "liar.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"liar\.pt: corrupt legacy torch file: storage '\d+' holds 5 elements, but the pickle declares 4$"):
        load_checkpoint(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_in_memory_cap(make_ckpt, tmp_path, monkeypatch, legacy):
    """BNCLI_MAX_LOAD_BYTES bounds what one load reads into memory, whichever reader reads it."""
    from bncli.audit import inspect_file

    path = tmp_path / "m.pt"
    torch.save(bn_state(64), path, _use_new_zipfile_serialization=not legacy)
    monkeypatch.setenv("BNCLI_MAX_LOAD_BYTES", "700")
    with pytest.raises(InputError) as info:
        inspect_file(path)  # the layer's four 256-byte tensors (and a zip's pickle) pass 700 bytes
    assert info.value.message.startswith(f"{path}: ")
    assert info.value.message.endswith("above the 700 bytes limit on what one load may read (BNCLI_MAX_LOAD_BYTES)")
    monkeypatch.setenv("BNCLI_MAX_LOAD_BYTES", "100000")
    assert inspect_file(path).layers


def test_npz_declaring_more_than_the_cap(tmp_path, monkeypatch):
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, x=np.zeros((1, 1, 1000, 1000), np.float32))  # 4 MB that compresses to a few KB
    monkeypatch.setenv("BNCLI_MAX_LOAD_BYTES", "1000000")
    with pytest.raises(InputError) as info:
        load_tensor(path)
    assert info.value.message == f"{path}: declares 4.0 MB of arrays, above the limit (BNCLI_MAX_LOAD_BYTES)"


@pytest.mark.parametrize("how", ["zip", "legacy", "st"])
def test_file_name_not_utf8(tmp_path, how):
    """torch's C++ reader cannot take such a name; bncli still loads the file and prints the name escaped."""
    path = _save(bn_state(), tmp_path / os.fsdecode(b"mod\xe8le.pt"), how)
    ckpt = load_checkpoint(path)
    assert ckpt.provenance.path == str(tmp_path) + "/mod\\xe8le.pt"
    np.testing.assert_array_equal(ckpt.read("bn.running_var"), bn_state()["bn.running_var"].numpy())


@pytest.mark.parametrize("how", ["zip", "legacy"])
def test_checkpoint_saved_on_gpu_loads_on_cpu(tmp_path, monkeypatch, how):
    """Storages tagged 'cuda:0' (as a GPU run saves them) load on a machine without a GPU."""
    import torch.serialization

    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    path = _save(bn_state(), tmp_path / "gpu.pt", how)
    monkeypatch.undo()
    assert b"cuda:0" in path.read_bytes()  # the pickle (stored uncompressed in a zip too) names the GPU
    ckpt = load_checkpoint(path)
    np.testing.assert_array_equal(ckpt.read("bn.running_var"), bn_state()["bn.running_var"].numpy())


@pytest.mark.parametrize("how", ["zip", "legacy", "st"])
def test_read_returns_arrays_of_their_own(tmp_path, how):
    """recalibrate may overwrite the file it read: what read() returned must not change with it."""
    sd = bn_state(4, seed=5)
    path = _save(sd, tmp_path / "m.pt", how)
    ckpt = load_checkpoint(path)
    before = ckpt.read("bn.running_var")
    path.write_bytes(b"\0" * path.stat().st_size)  # the file changes under the reader
    np.testing.assert_array_equal(before, sd["bn.running_var"].numpy())
