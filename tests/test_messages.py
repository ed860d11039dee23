"""Messages in the user's words: what a mistaken call is, and the call that would work."""

from __future__ import annotations

from collections import OrderedDict

from conftest import SAMPLES, bn_state


def test_normalize_given_a_checkpoint_says_so_and_shows_the_layer_form(cli, make_ckpt):
    sd = OrderedDict()
    for i in range(5):
        sd.update(bn_state(4, prefix=f"blocks.{i}.bn"))
    path = make_ckpt(sd)
    result = cli("normalize", path)
    assert result.exit_code == 3
    assert result.stderr == (
        f"error: {path}: a checkpoint with 5 BatchNorm layers (blocks.0.bn, blocks.1.bn, blocks.2.bn, ...), not an input "
        f"tensor; to apply one of its layers: bncli normalize INPUT --checkpoint {path} --layer blocks.0.bn\n"
    )


def test_normalize_with_many_plain_tensors_still_asks_for_key(cli, make_ckpt):
    import torch

    path = make_ckpt({f"t{i}": torch.ones(2, 3, 4, 4) for i in range(12)})
    result = cli("normalize", path)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {path}: holds 12 tensors; choose one with --key: t0, t1,")
    assert result.stderr.endswith(", ... (12 in all)\n")


def test_diff_with_no_common_layer_suggests_the_prefix(cli, make_ckpt):
    a, b = OrderedDict(), OrderedDict()
    for i in range(3):
        a.update({f"model.{k}": v for k, v in bn_state(4, prefix=f"features.{i}").items()})
        b.update(bn_state(4, prefix=f"features.{i}"))
    pa, pb = make_ckpt(a, "a.pt"), make_ckpt(b, "b.pt")
    result = cli("diff", pa, pb)
    assert result.exit_code == 0
    assert result.stderr == ("warning: no BatchNorm layer is in both files, but 3 match once a prefix is removed: rerun "
                             "with --strip-prefix-a model\n")
    assert cli("diff", pb, pa, "--format", "json").stderr.endswith("rerun with --strip-prefix-b model\n")
    fixed = cli("diff", pa, pb, "--strip-prefix-a", "model")
    assert fixed.stderr == "" and "3 layers in both" in fixed.stdout


def test_diff_of_unrelated_files_has_no_hint(cli, make_ckpt):
    pa = make_ckpt(bn_state(4, prefix="x.bn"), "a.pt")
    pb = make_ckpt(bn_state(4, prefix="y.norm"), "b.pt")
    assert cli("diff", pa, pb).stderr == ""


def test_normalize_help_offers_only_its_formats(cli):
    text = cli("normalize", "--help").stdout
    assert "table|json" in text and "markdown" not in text and "github" not in text


def test_inspect_error_is_said_once(cli):
    result = cli("inspect", SAMPLES / "model.pt", "nope.pt")
    assert result.exit_code == 3
    assert result.stderr == "error: nope.pt: no such file\n"
    assert "nope.pt" not in result.stdout and "(1 unreadable)" in result.stdout
