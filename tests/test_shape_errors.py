"""Every shape or dtype mistake gives one clear line on stderr, exit 3, and no traceback."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLES, bn_state


def _one_line_error(result, *fragments, code=3):
    assert result.exit_code == code, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def tensor_file(tmp_path):
    def save(tensor, name="x.pt"):
        path = tmp_path / name
        torch.save(tensor, path)
        return path

    return save


def test_three_dims_suggests_batch_dim(cli, tensor_file):
    _one_line_error(cli("normalize", tensor_file(torch.randn(3, 32, 32))), "got shape (3, 32, 32)", "--add-batch-dim")


def test_two_dims_names_batchnorm1d(cli, tensor_file):
    _one_line_error(cli("normalize", tensor_file(torch.randn(8, 3))), "(8, 3)", "BatchNorm1d takes (N, C)")


def test_five_dims_names_batchnorm3d(cli, tensor_file):
    _one_line_error(cli("normalize", tensor_file(torch.randn(2, 3, 4, 4, 4))), "BatchNorm3d takes (N, C, D, H, W)")


def test_channel_mismatch_hints_channels_last(cli, tensor_file, make_ckpt):
    ckpt = make_ckpt(bn_state(channels=3, prefix="stem.bn"))
    result = cli("normalize", SAMPLES / "input_nhwc.pt", "-c", ckpt, "-l", "stem.bn")
    _one_line_error(result, "16 channels in dim 1", "num_features=3", "--channels-last")
    fixed = cli("normalize", SAMPLES / "input_nhwc.pt", "-c", ckpt, "-l", "stem.bn", "--channels-last")
    assert fixed.exit_code == 0, fixed


def test_channel_mismatch_without_hint(cli, tensor_file, make_ckpt):
    ckpt = make_ckpt(bn_state(channels=5, prefix="bn"))
    result = cli("normalize", tensor_file(torch.randn(2, 3, 4, 4)), "-c", ckpt, "-l", "bn")
    _one_line_error(result, "3 channels in dim 1", "num_features=5")
    assert "channels-last" not in result.stderr


def test_train_with_one_value_per_channel(cli, tensor_file):
    path = tensor_file(torch.randn(1, 3, 1, 1))
    _one_line_error(cli("normalize", path), "more than 1 value per channel", "N*H*W = 1", "--mode eval")
    assert cli("normalize", path, "--mode", "eval").exit_code == 0


@pytest.mark.parametrize(
    ("tensor", "name"),
    [
        (torch.ones(2, 3, 4, 4, dtype=torch.int64), "int64"),
        (torch.ones(2, 3, 4, 4, dtype=torch.bool), "bool"),
        (torch.ones(2, 3, 4, 4, dtype=torch.complex64), "complex64"),
    ],
)
def test_non_float_dtypes(cli, tensor_file, tensor, name):
    _one_line_error(cli("normalize", tensor_file(tensor)), f"dtype {name} is not supported", "floating-point")


def test_empty_tensor(cli, tensor_file):
    _one_line_error(cli("normalize", tensor_file(torch.empty(0, 3, 4, 4))), "empty", "(0, 3, 4, 4)")


def test_several_tensors_need_key(cli):
    _one_line_error(cli("normalize", SAMPLES / "inputs.safetensors"), "holds 2 tensors; choose one with --key: labels, images")  # file order


def test_unknown_key_lists_keys(cli):
    _one_line_error(cli("normalize", SAMPLES / "inputs.safetensors", "--key", "imgs"), "no tensor named 'imgs'; it holds: ", "images", "labels")


def test_add_batch_dim_on_4d(cli):
    _one_line_error(cli("normalize", SAMPLES / "input.pt", "--add-batch-dim"), "--add-batch-dim expects a 3-D tensor")


def test_missing_file(cli, tmp_path):
    _one_line_error(cli("normalize", tmp_path / "nope.pt"), "nope.pt", "no such file")


def test_checkpoint_without_layer_is_a_usage_error(cli, make_ckpt):
    result = cli("normalize", SAMPLES / "input.pt", "-c", make_ckpt(bn_state()))
    assert result.exit_code == 2 and "--checkpoint and --layer go together" in result.stderr


def test_unknown_layer_in_normalize(cli):
    # the user's argument, not a bad file: exit 2
    _one_line_error(cli("normalize", SAMPLES / "activations.pt", "-c", SAMPLES / "model.pt", "-l", "features.2"), "features.1",
                    code=2)


def test_bad_output_suffix(cli, tmp_path):
    _one_line_error(cli("normalize", SAMPLES / "input.pt", "-o", tmp_path / "y.txt"), "unsupported output suffix")
    assert not (tmp_path / "y.txt").exists()


def test_usage_errors_exit_2(cli):
    assert cli("normalize", SAMPLES / "input.pt", "--momentum", "3").exit_code == 2
    for eps in ("-1e-5", "nan", "inf"):
        refused = cli("normalize", SAMPLES / "input.pt", "--eps", eps)
        assert refused.exit_code == 2 and "eps must be a finite number >= 0" in refused.stderr, refused
    assert cli("normalize", SAMPLES / "input.pt", "--eps", "0", "--mode", "eval").exit_code == 0  # FrozenBatchNorm2d
    assert cli("normalize", SAMPLES / "input.pt", "--mode", "test").exit_code == 2


def test_fresh_layer_warns_when_input_looks_nhwc(cli):
    result = cli("normalize", SAMPLES / "input_nhwc.pt")
    assert result.exit_code == 0, result
    assert "looks channels-last (N, H, W, C) with C=3" in result.stderr
    quiet = cli("normalize", SAMPLES / "input_nhwc.pt", "--channels-last")
    assert quiet.exit_code == 0 and "channels-last" not in quiet.stderr
    assert "channels-last" not in cli("normalize", SAMPLES / "input.pt").stderr


def test_no_channels_last_hint_for_square_nchw_images(cli, make_ckpt):
    # (8, 3, 16, 16) against a 16-channel layer: the last dim matches, but NCHW with square 16x16 images
    # is the likelier reading, so no hint that would send the user the wrong way.
    result = cli("normalize", SAMPLES / "input.pt", "-c", SAMPLES / "model.pt", "-l", "features.1")
    _one_line_error(result, "3 channels in dim 1", "num_features=16")
    assert "--channels-last" not in result.stderr


def test_checkpoint_layer_warns_when_input_looks_nhwc(cli):
    # (8, 16, 16, 3): dim 1 (H = 16) equals features.1's 16 channels, so every check passes and the numbers
    # would be silently wrong; the warning says so.
    result = cli("normalize", SAMPLES / "input_nhwc.pt", "-c", SAMPLES / "model.pt", "-l", "features.1")
    assert result.exit_code == 0, result
    assert "looks channels-last (N, H, W, C) with C=3" in result.stderr


def test_checkpoint_given_as_tensor_says_what_it_is(cli):
    _one_line_error(cli("normalize", SAMPLES / "model.pt"), "a checkpoint with 3 BatchNorm layers", "under 'state_dict'", "--checkpoint")


def test_float8_input_is_refused_in_one_line(cli, tensor_file):
    x = torch.randn(2, 3, 4, 4).to(torch.float8_e4m3fn)
    _one_line_error(cli("normalize", tensor_file(x)), "dtype float8_e4m3fn is not supported")


def test_big_endian_npy_is_read(cli, tmp_path):
    import numpy as np

    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(">f4")
    np.save(tmp_path / "be.npy", x)
    result = cli("normalize", tmp_path / "be.npy", "-f", "json")
    assert result.exit_code == 0, result
    import json

    channels = json.loads(result.stdout)["channels"]
    assert channels[1]["input_mean"] == pytest.approx(x[:, 1].astype(np.float64).mean(), rel=1e-6)


def test_unsupported_format_fails_before_writing(cli, tmp_path):
    out = tmp_path / "y.pt"
    result = cli("normalize", SAMPLES / "input.pt", "-o", out, "-f", "markdown")
    assert result.exit_code == 2 and "not available for `bncli normalize`" in result.stderr
    assert not out.exists()


def test_npy_above_the_memory_cap(cli, monkeypatch):
    monkeypatch.setenv("BNCLI_MAX_LOAD_BYTES", "1000")
    _one_line_error(cli("normalize", SAMPLES / "input.npy"), "declares 24.6 KB of data, above the 1.0 KB limit (BNCLI_MAX_LOAD_BYTES)")


def test_bad_memory_cap_setting_is_a_usage_error(cli, monkeypatch):
    monkeypatch.setenv("BNCLI_MAX_LOAD_BYTES", "8G")
    result = cli("inspect", SAMPLES / "model.pt")
    assert result.exit_code == 2
    assert result.stderr == "error: BNCLI_MAX_LOAD_BYTES='8G' is not a number of bytes (e.g. 8000000000)\n"


def test_checkpoint_layer_with_lengths_that_differ(cli, make_ckpt):
    state = bn_state(channels=3, prefix="bn")
    state["bn.bias"] = torch.zeros(4)
    ckpt = make_ckpt(state)
    result = cli("normalize", SAMPLES / "input.pt", "-c", ckpt, "-l", "bn")
    _one_line_error(result, "layer 'bn': lengths differ: running_mean 3, running_var 3, weight 3, bias 4", "bncli inspect")
