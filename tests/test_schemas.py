"""Every JSON output has a committed schema in docs/schema/ with schema_version, checked against real outputs.

schema_lite with closed=True also fails on a key the schema does not document; jsonschema (the test extra)
checks the same outputs against the full draft 2020-12 meaning of the schemas.
"""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, SAMPLES, bn_state
from schema_lite import validate

SCHEMAS = {name: json.loads((ROOT / "docs" / "schema" / f"{name}.json").read_text())
           for name in ("inspect", "diff", "normalize", "recalibrate", "rules")}


def check(name: str, stdout: str) -> dict:
    payload = json.loads(stdout)
    assert payload["schema_version"] == 1
    assert validate(payload, SCHEMAS[name], closed=True) == []
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(SCHEMAS[name]).validate(payload)
    return payload


def test_every_schema_is_valid_and_versioned():
    jsonschema = pytest.importorskip("jsonschema")
    for name, schema in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["properties"]["schema_version"] == {"const": 1}, name
        assert "schema_version" in schema["required"], name
        assert schema["$id"].endswith(f"docs/schema/{name}.json"), name


def test_diff_outputs_match_the_schema(cli, make_ckpt):
    whole = check("diff", cli("diff", SAMPLES / "model.pt", SAMPLES / "model_defects.pt", "-f", "json").stdout)
    assert whole["gate"] is None and whole["summary"]["layers"] == 3
    one = check("diff", cli("diff", SAMPLES / "model.pt", SAMPLES / "model_defects.pt", "-f", "json", "--layer", "features.5").stdout)
    assert "channels" in one["layers"][0] and "non_finite" in one["layers"][0]
    gated = cli("diff", SAMPLES / "model.pt", SAMPLES / "model_defects.pt", "-f", "json", "--fail-on-change")
    assert gated.exit_code == 1
    gate = check("diff", gated.stdout)["gate"]
    assert gate["option"] == "fail-on-change" and gate["failed"] is True and gate["layers"]
    a = make_ckpt({**bn_state(4, "bn1"), **bn_state(4, "only_in_a")}, "a.pt")
    b = make_ckpt({**bn_state(6, "bn1", seed=1), **bn_state(4, "only_in_b")}, "b.pt")
    odd = check("diff", cli("diff", a, b, "-f", "json").stdout)
    assert odd["layers"][0]["verdict"] == "shape-changed" and odd["only_a"] == ["only_in_a"] and odd["only_b"] == ["only_in_b"]


def test_normalize_output_matches_the_schema(cli, tmp_path):
    plain = check("normalize", cli("normalize", SAMPLES / "input.pt", "-f", "json").stdout)
    assert plain["output"] is None and plain["mode"] == "train"
    out = tmp_path / "y.pt"
    written = check("normalize", cli("normalize", SAMPLES / "input.pt", "-f", "json", "--mode", "eval", "--momentum", "none",
                                     "--output", out).stdout)
    assert written["output"] == str(out) and written["momentum"] is None


def test_recalibrate_output_matches_the_schema(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = cli("recalibrate", SAMPLES / "model_defects.safetensors", "-m", "sample_data.smallcnn:small_cnn",
                 "-d", SAMPLES / "input.pt", "-b", "4", "-o", tmp_path / "r.safetensors", "--format", "json")
    assert result.exit_code == 0, result
    payload = check("recalibrate", result.stdout)
    assert payload["samples"] == 8 and payload["diff"]["summary"]["layers"] == 3


def test_inspect_and_rules_outputs_match_their_schemas(cli):
    check("inspect", cli("inspect", SAMPLES / "model_defects.pt", "-f", "json").stdout)
    every = check("rules", cli("rules", "-f", "json").stdout)
    assert len(every["rules"]) >= 11
    check("rules", cli("rules", "BN004", "-f", "json").stdout)


def test_a_key_missing_from_the_schema_is_caught():
    payload = json.loads(json.dumps({"schema_version": 1, "rules": []}))
    payload["surprise"] = 1
    assert validate(payload, SCHEMAS["rules"], closed=True) != []


def test_normalize_kind_and_non_finite_match_the_schema(cli, tmp_path):
    import torch

    x = torch.randn(6, 3)
    x[0, 1] = float("inf")
    torch.save(x, tmp_path / "x.pt")
    payload = check("normalize", cli("normalize", tmp_path / "x.pt", "--kind", "1d", "-f", "json").stdout)
    assert payload["kind"] == "1d" and payload["channels"][1]["non_finite"]["input_mean"] == "inf"
