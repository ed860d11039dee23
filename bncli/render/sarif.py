"""SARIF 2.1.0 for `inspect`: the rule catalogue as tool.driver.rules, one result per finding, for code scanning.

Checkpoints are binary, so every result points at line 1 of its file; `partialFingerprints` are a hash of the
file, the rule and the layer (not of the message, whose numbers move), so GitHub code scanning tracks a finding
across commits. Unreadable inputs are tool execution notifications (the run did not succeed), not results.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import quote

from bncli import __version__
from bncli.report import Finding, InspectReport, Severity

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
FINGERPRINT = "bncliFinding/v1"


def artifact_uri(path: str, cwd: str | None = None) -> str:
    """The file relative to the working directory, as a URI reference (percent-encoded, forward slashes);
    outside the working directory, an absolute file:// URI."""
    cwd = cwd or os.getcwd()
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute, cwd)
    except ValueError:  # another drive on Windows
        relative = None
    if relative is None or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return Path(absolute).as_uri()
    return quote(Path(relative).as_posix(), safe="/", errors="surrogateescape")  # an undecodable byte: %XX


def fingerprint(uri: str, finding: Finding) -> str:
    key = json.dumps([uri, finding.rule, finding.layer])  # unambiguous whatever the names contain
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _rule_descriptor(rule) -> dict:
    from bncli import ruledoc

    return {
        "id": rule.id,
        "name": rule.name,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": rule.detects.replace("`", "")},
        "help": {"text": ruledoc.explain(rule), "markdown": ruledoc.markdown_section(rule)},
        "helpUri": rule.help_uri,
        "defaultConfiguration": {"level": LEVELS[rule.severity]},
        "properties": {"tags": ["batchnorm", rule.severity.value], "scope": rule.scope},
    }


def inspect_payload(report: InspectReport, cwd: str | None = None) -> dict:
    from bncli.rules import RULES

    rules = sorted(RULES, key=lambda r: r.id)
    index = {r.id: i for i, r in enumerate(rules)}
    results, notifications = [], []
    for file in report.files:
        uri = artifact_uri(file.path, cwd)
        location = {"physicalLocation": {"artifactLocation": {"uri": uri}, "region": {"startLine": 1}}}
        if file.error is not None:
            notifications.append({"level": "error", "message": {"text": file.error}, "locations": [location]})
            continue
        for f in file.findings:
            result = {
                "ruleId": f.rule,
                "ruleIndex": index[f.rule] if f.rule in index else -1,
                "level": LEVELS[f.severity],
                "message": {"text": f"{f.layer}: {f.message}" if f.layer is not None else f.message},
                "locations": [
                    {
                        **location,
                        **({"logicalLocations": [{"name": f.layer, "kind": "member"}]} if f.layer is not None else {}),
                    }
                ],
                "partialFingerprints": {FINGERPRINT: fingerprint(uri, f)},
                "properties": {"channels": list(f.channels), "layer": f.layer},
            }
            if result["ruleIndex"] < 0:
                del result["ruleIndex"]
            results.append(result)
    run = {
        "tool": {
            "driver": {
                "name": "bncli",
                "version": __version__,
                "semanticVersion": __version__,
                "informationUri": "https://github.com/bncli/bncli",
                "rules": [_rule_descriptor(r) for r in rules],
            }
        },
        "invocations": [{"executionSuccessful": not notifications, "toolExecutionNotifications": notifications}],
        "results": results,
        "columnKind": "unicodeCodePoints",
    }
    return {"$schema": SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def inspect_sarif(report: InspectReport) -> str:
    # json.dumps escapes every file-derived string for JSON (bncli/console.py's JSON escaping is this same call).
    return json.dumps(inspect_payload(report), indent=2)


# `bncli diff` gates as SARIF rules: a result for each layer that violates the gate given, on file B.
DIFF_DOCS = "https://github.com/bncli/bncli/blob/main/docs/diff.md#exit-codes-and-ci"
DIFF_GATES = {
    "fail-on-change": ("A BatchNorm layer differs between A and B while it must stay frozen (--fail-on-change).",
                       "Frozen BatchNorm layers (fine-tuning with the backbone frozen) must keep their statistics: a "
                       "layer in train mode updates them anyway. Put the frozen modules in eval mode, or set "
                       "momentum=0 / requires_grad=False as your recipe intends."),
    "fail-if-unchanged": ("A BatchNorm layer is identical in A and B while fine-tuning must update it (--fail-if-unchanged).",
                          "A layer that fine-tuning did not touch ran in eval mode or was left out of the optimizer: "
                          "its statistics still describe the old data. Check model.train() and the parameter groups."),
}


def diff_payload(report, cwd: str | None = None) -> dict:
    uri = artifact_uri(report.path_b, cwd)
    location = {"physicalLocation": {"artifactLocation": {"uri": uri}, "region": {"startLine": 1}}}
    gates = list(DIFF_GATES)
    results = []
    if report.gate is not None:
        verdicts = {layer.name: layer.verdict for layer in report.layers}
        names = list(report.violations) or ([None] if report.failed else [])
        for name in names:
            text = f"{name}: {verdicts.get(name, '')}" if name is not None else "no BatchNorm layer is in both checkpoints"
            key = json.dumps([uri, report.gate, name])
            results.append({
                "ruleId": report.gate,
                "ruleIndex": gates.index(report.gate),
                "level": "error",
                "message": {"text": f"--{report.gate}: {text}"},
                "locations": [{**location, **({"logicalLocations": [{"name": name, "kind": "member"}]} if name else {})}],
                "partialFingerprints": {FINGERPRINT: hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()},
            })
    rules = [
        {"id": gate, "name": gate, "shortDescription": {"text": short}, "fullDescription": {"text": short},
         "help": {"text": f"{short} {fix}", "markdown": f"{short}\n\n{fix}"}, "helpUri": DIFF_DOCS,
         "defaultConfiguration": {"level": "error"}}
        for gate, (short, fix) in DIFF_GATES.items()
    ]
    run = {
        "tool": {"driver": {"name": "bncli", "version": __version__, "semanticVersion": __version__,
                            "informationUri": "https://github.com/bncli/bncli", "rules": rules}},
        "invocations": [{"executionSuccessful": True, "toolExecutionNotifications": []}],
        "results": results,
        "columnKind": "unicodeCodePoints",
        "automationDetails": {"id": "bncli-diff/"},
    }
    return {"$schema": SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def diff_sarif(report) -> str:
    return json.dumps(diff_payload(report), indent=2)
