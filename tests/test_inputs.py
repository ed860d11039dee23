"""Inputs: a directory scan looks at every regular file's first bytes; globs and folders never loop on links."""

from __future__ import annotations

import json
import os

from conftest import bn_state

from bncli.audit import expand_inputs, glob_paths


def _tree(tmp_path, make_ckpt):
    """runs/ with a checkpoint without a suffix, a safetensors file named .data, notes, and links back up."""
    from safetensors.torch import save_file

    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    make_ckpt(bn_state(), "x.pt").rename(runs / "a" / "model.pt")
    make_ckpt(bn_state(seed=1), "y.pt").rename(runs / "ENet_default")  # a real checkpoint, no suffix
    save_file({k: v for k, v in bn_state(seed=2).items()}, str(runs / "weights.data"))
    (runs / "notes.txt").write_text("hello {not safetensors}")
    (runs / "config.json").write_text('{"lr": 0.1, "nested": {"a": 1}}')
    (runs / "empty").write_bytes(b"")
    (runs / ".hidden").write_text("x")
    (runs / "latest").symlink_to(".")  # a loop
    (runs / "a" / "up").symlink_to("..")  # another
    return runs


def test_a_directory_scan_reads_first_bytes_and_counts_the_rest(tmp_path, make_ckpt, cli):
    runs = _tree(tmp_path, make_ckpt)
    inputs = expand_inputs([runs])
    assert list(inputs) == [str(runs / "ENet_default"), str(runs / "weights.data"), str(runs / "a" / "model.pt")]
    assert inputs.skipped == tuple(str(runs / n) for n in ("config.json", "empty", "notes.txt"))
    result = cli("inspect", runs)
    assert result.exit_code == 0, result
    assert "skipped 3 files that are not checkpoints: " in result.stdout and result.stderr == ""
    assert result.stdout.rstrip().splitlines()[-1].startswith("3 files (0 unreadable), 3 BatchNorm layers")
    payload = json.loads(cli("inspect", runs, "--format", "json").stdout)
    assert payload["summary"]["skipped"] == 3 and payload["skipped"] == list(inputs.skipped)
    assert "skipped 3 files" in cli("inspect", runs, "--format", "markdown").stdout


def test_a_directory_with_no_checkpoint_says_what_it_saw(tmp_path, cli):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.md").write_text("# hi")
    result = cli("inspect", tmp_path / "d")
    assert result.exit_code == 3
    assert result.stderr == f"error: {tmp_path / 'd'}: no checkpoint file in this directory (1 other file, none a checkpoint)\n"


def test_recursive_globs_enter_each_folder_once(tmp_path, make_ckpt, monkeypatch, cli):
    runs = _tree(tmp_path, make_ckpt)
    monkeypatch.chdir(tmp_path)
    assert glob_paths("runs/**/*.pt") == ["runs/a/model.pt"]  # not runs/latest/a/model.pt, runs/latest/latest/...
    assert glob_paths(str(runs) + "/**/model.pt") == [str(runs / "a" / "model.pt")]
    assert glob_paths("runs/*.txt") == ["runs/notes.txt"]
    assert glob_paths("runs/**") == sorted(["runs", "runs/a", "runs/ENet_default", "runs/a/model.pt", "runs/config.json",
                                            "runs/empty", "runs/notes.txt", "runs/weights.data"])
    result = cli("inspect", "runs/**/*.pt")
    assert result.exit_code == 0 and "1 BatchNorm layer" in result.stdout


def test_glob_matches_what_the_standard_glob_finds_without_links(tmp_path, monkeypatch):
    import glob

    for d in ("a/b/c", "a/d", "e"):
        (tmp_path / d).mkdir(parents=True)
    for f in ("a/x.pt", "a/b/y.pt", "a/b/c/z.pt", "a/d/w.ckpt", "e/v.pt", "top.pt", "a/.h.pt"):
        (tmp_path / f).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for pattern in ("**/*.pt", "a/**/*.pt", "*/*.pt", "a/*/*", "**", "a/**", "?/*.pt", "[ae]/*.pt", "top.pt", "nope/*"):
        standard = sorted({p.rstrip("/") for p in glob.glob(pattern, recursive=True)})  # glob writes 'a/' for a/**
        assert glob_paths(pattern) == standard, pattern
    assert glob_paths(os.path.join(str(tmp_path), "**", "*.pt")) == sorted(
        glob.glob(os.path.join(str(tmp_path), "**", "*.pt"), recursive=True))


def test_layer_accepts_the_stored_and_the_stripped_name(make_ckpt, cli):
    from collections import OrderedDict

    sd = OrderedDict()
    for name in ("bn1", "layer1.0.bn1", "layer1.0.bn2"):
        sd.update({f"module.{k}": v for k, v in bn_state(4, prefix=name).items()})
    path = make_ckpt({"state_dict": sd})
    stripped = cli("inspect", path, "--layer", "bn1", "--format", "json")
    stored = cli("inspect", path, "--layer", "module.bn1", "--format", "json")
    assert stripped.exit_code == stored.exit_code == 0
    assert json.loads(stored.stdout)["files"][0]["layers"][0]["name"] == "bn1"
    assert stored.stdout == stripped.stdout
    missing = cli("inspect", path, "--layer", "module.bn3")
    assert missing.exit_code == 2 and missing.stdout == ""  # the user's argument: one line, exit 2
    assert missing.stderr == f"error: {path}: no BatchNorm layer named 'module.bn3'; nearest: bn1\n"
    near = cli("inspect", path, "--layer", "0.bn1")
    assert near.stderr.endswith("nearest: layer1.0.bn1, bn1, layer1.0.bn2\n")  # a dotted suffix first
    diff = cli("diff", path, path, "--layer", "module.layer1.0.bn2")
    assert diff.exit_code == 0 and "layer layer1.0.bn2, channel by channel" in diff.stdout


def test_safetensors_layers_come_in_natural_order(tmp_path, cli):
    from safetensors.torch import save_file

    from bncli.layers import natural_key

    sd = {}
    for i in (1, 4, 7, 10, 13):
        sd.update(bn_state(3, prefix=f"features.{i}", seed=i))
    path = tmp_path / "nat.safetensors"
    save_file(sd, str(path))  # safetensors stores the keys sorted as strings: 1, 10, 13, 4, 7
    want = ["features.1", "features.4", "features.7", "features.10", "features.13"]
    for fmt in ("json",):
        names = [x["name"] for x in json.loads(cli("inspect", path, "--format", fmt).stdout)["files"][0]["layers"]]
        assert names == want
    table = cli("inspect", path).stdout
    assert [line.split(" ")[0] for line in table.splitlines() if line.startswith("features.")] == want
    diff = json.loads(cli("diff", path, path, "--format", "json").stdout)
    assert [x["name"] for x in diff["layers"]] == want
    assert sorted(["b.10", "b.2", "a", "b.2a", "b.1.x"], key=natural_key) == ["a", "b.1.x", "b.2", "b.2a", "b.10"]
