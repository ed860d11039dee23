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
    return quote(Path(relative).as_posix(), safe="/")


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
