"""`inspect --format sarif`: a SARIF 2.1.0 log with the rule catalogue, one result per finding, stable fingerprints.

The required fields are those of the SARIF 2.1.0 JSON schema (sarif-schema-2.1.0.json, OASIS), checked here by
hand: no network, and jsonschema would need the 300 KB schema in the repository.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import SAMPLES, bn_state

from bncli.render.sarif import artifact_uri, fingerprint
from bncli.report import Finding, Severity
from bncli.rules import RULES

LEVELS = {"none", "note", "warning", "error"}


def _message(m, where):
    assert isinstance(m, dict) and ("text" in m or "id" in m), where  # message: anyOf text / id
    if "text" in m:
        assert isinstance(m["text"], str), where


def _location(loc, where):
    phys = loc.get("physicalLocation")
    if phys is not None:
        art = phys.get("artifactLocation", {})
        assert isinstance(art.get("uri", ""), str), where
        region = phys.get("region")
        if region is not None:
            assert isinstance(region.get("startLine", 1), int) and region.get("startLine", 1) >= 1, where
    for logical in loc.get("logicalLocations", []):
        assert isinstance(logical.get("name", ""), str), where


def check_sarif_required(log: dict) -> None:
    """Every property the SARIF 2.1.0 schema marks as required, with its type, in what bncli writes."""
    assert log["version"] == "2.1.0"  # sarifLog: version, runs
    assert isinstance(log["runs"], list)
    for r, run in enumerate(log["runs"]):
        driver = run["tool"]["driver"]  # run: tool; tool: driver; toolComponent: name
        assert isinstance(driver["name"], str) and driver["name"]
        ids = []
        for d in driver.get("rules", []):  # reportingDescriptor: id
            assert isinstance(d["id"], str) and d["id"]
            ids.append(d["id"])
            for key in ("shortDescription", "fullDescription", "help"):  # multiformatMessageString: text
                if key in d:
                    assert isinstance(d[key]["text"], str), (d["id"], key)
            if "defaultConfiguration" in d:
                assert d["defaultConfiguration"].get("level", "warning") in LEVELS
        assert len(set(ids)) == len(ids)
        for inv in run.get("invocations", []):  # invocation: executionSuccessful
            assert isinstance(inv["executionSuccessful"], bool)
            for note in inv.get("toolExecutionNotifications", []):  # notification: message
                _message(note["message"], "notification")
                assert note.get("level", "warning") in LEVELS
                for loc in note.get("locations", []):
                    _location(loc, "notification")
        for i, result in enumerate(run.get("results", [])):  # result: message
            where = f"run {r} result {i}"
            _message(result["message"], where)
            assert result.get("level", "warning") in LEVELS, where
            if "ruleIndex" in result:
                assert ids[result["ruleIndex"]] == result["ruleId"], where
            for loc in result.get("locations", []):
                _location(loc, where)
            for value in result.get("partialFingerprints", {}).values():
                assert isinstance(value, str), where


def sarif(cli, *args, code=None):
    result = cli("inspect", *args, "--format", "sarif")
    if code is not None:
        assert result.exit_code == code, result
    return json.loads(result.stdout), result


def test_the_samples_findings_as_sarif(cli, monkeypatch):
    monkeypatch.chdir(SAMPLES.parent)
    log, result = sarif(cli, "sample_data/model_defects.pt", code=1)
    check_sarif_required(log)
    (run,) = log["runs"]
    assert run["invocations"][0]["executionSuccessful"] is True
    rules = run["tool"]["driver"]["rules"]
    assert [d["id"] for d in rules] == sorted(r.id for r in RULES)
    bn004 = next(d for d in rules if d["id"] == "BN004")
    assert bn004["helpUri"].endswith("docs/rules.md#bn004-collapsed-variance")
    assert bn004["help"]["markdown"].startswith("## BN004 collapsed-variance")
    assert "What it detects." in bn004["help"]["text"] and bn004["defaultConfiguration"]["level"] == "warning"
    got = [(x["ruleId"], x["level"], x["locations"][0]["logicalLocations"][0]["name"]) for x in run["results"]]
    from bncli.audit import inspect_files

    findings = inspect_files([SAMPLES / "model_defects.pt"]).findings
    levels = {"error": "error", "warning": "warning", "info": "note"}
    assert got == [(f.rule, levels[f.severity.value], f.layer) for f in findings]
    assert ("BN003", "error", "features.1") in got and ("BN005", "note", "features.9") in got
    first = run["results"][0]
    assert first["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": "sample_data/model_defects.pt"},
        "region": {"startLine": 1},
    }
    assert first["message"]["text"].startswith("features.1: every running_mean is 0")
    assert result.stderr == ""


def test_fingerprints_follow_file_rule_and_layer_not_the_message():
    a = Finding("BN004", "collapsed-variance", Severity.WARNING, "bn1", (1,), "running_var below 1e-05 in channel(s) 1")
    moved = Finding("BN004", "collapsed-variance", Severity.WARNING, "bn1", (1, 2), "running_var below 1e-05 in channel(s) 1, 2")
    assert fingerprint("m.pt", a) == fingerprint("m.pt", moved)
    assert fingerprint("m.pt", a) != fingerprint("n.pt", a)
    other = Finding("BN004", "collapsed-variance", Severity.WARNING, "bn2", (1,), a.message)
    assert fingerprint("m.pt", a) != fingerprint("m.pt", other)
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint("m.pt", a))


def test_uris_are_relative_to_the_working_directory_and_percent_encoded(tmp_path):
    assert artifact_uri(str(tmp_path / "dir" / "a b#1.pt"), str(tmp_path)) == "dir/a%20b%231.pt"
    outside = artifact_uri(str(tmp_path / "x.pt"), str(tmp_path / "sub"))
    assert outside.startswith("file:///") and outside.endswith("/x.pt")


def test_hostile_layer_names_stay_data(cli, make_ckpt, monkeypatch, tmp_path):
    sd = bn_state(prefix='evil"\n::error::x')
    sd['evil"\n::error::x.running_var'][0] = float("nan")
    make_ckpt(sd, "m.pt")
    monkeypatch.chdir(tmp_path)
    log, result = sarif(cli, "m.pt", code=1)
    check_sarif_required(log)
    (hit,) = [x for x in log["runs"][0]["results"] if x["ruleId"] == "BN001"]
    assert hit["locations"][0]["logicalLocations"][0]["name"] == 'evil"\n::error::x'
    assert "\n::error" not in result.stdout  # the newline is escaped in the JSON text


def test_an_unreadable_input_is_a_failed_invocation_not_a_result(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    log, result = sarif(cli, "junk.pt", str(SAMPLES / "model.pt"), code=3)
    check_sarif_required(log)
    inv = log["runs"][0]["invocations"][0]
    assert inv["executionSuccessful"] is False
    (note,) = inv["toolExecutionNotifications"]
    assert note["level"] == "error" and note["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "junk.pt"
    assert log["runs"][0]["results"] == []


def test_the_validator_catches_a_missing_required_field():
    with pytest.raises((AssertionError, KeyError)):
        check_sarif_required({"version": "2.1.0", "runs": [{"tool": {"driver": {}}}]})
    with pytest.raises((AssertionError, KeyError)):
        check_sarif_required({"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "x"}}, "results": [{"ruleId": "a"}]}]})


def test_diff_gates_as_sarif(cli, monkeypatch):
    monkeypatch.chdir(SAMPLES.parent)
    a, b = "sample_data/model.pt", "sample_data/model_defects.pt"
    gated = cli("diff", a, b, "--fail-on-change", "--format", "sarif")
    assert gated.exit_code == 1
    log = json.loads(gated.stdout)
    check_sarif_required(log)
    (run,) = log["runs"]
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == ["fail-on-change", "fail-if-unchanged"]
    names = [x["locations"][0]["logicalLocations"][0]["name"] for x in run["results"]]
    assert names == json.loads(cli("diff", a, b, "--fail-on-change", "-f", "json").stdout)["gate"]["layers"]
    assert all(x["ruleId"] == "fail-on-change" and x["level"] == "error" for x in run["results"])
    assert run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == b
    plain = json.loads(cli("diff", a, b, "--format", "sarif").stdout)
    check_sarif_required(plain)
    assert plain["runs"][0]["results"] == []  # no gate, nothing violated
    same = json.loads(cli("diff", a, a, "--fail-if-unchanged", "--format", "sarif").stdout)
    check_sarif_required(same)
    assert {x["ruleId"] for x in same["runs"][0]["results"]} == {"fail-if-unchanged"}


def test_an_undecodable_file_name_byte_is_percent_encoded(tmp_path):
    name = b"ckpt-\xff.pt".decode("utf-8", "surrogateescape")  # as os.listdir returns such a name
    assert artifact_uri(str(tmp_path / name), str(tmp_path)) == "ckpt-%FF.pt"
