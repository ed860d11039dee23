"""The rule catalogue as text, JSON and markdown: `bncli rules` prints it and docs/rules.md is generated from it.

Regenerate the page after changing a rule: `python3 -m bncli.ruledoc > docs/rules.md` (a test compares them).
"""

from __future__ import annotations

import json
import textwrap

from bncli.rules import RULES, Rule

SCHEMA_VERSION = 1

INTRO = """\
# bncli inspect: the rules

<!-- Generated from bncli/rules.py by `python3 -m bncli.ruledoc > docs/rules.md`; edit the rule, not this page. -->

Every finding of `bncli inspect` carries a stable rule id (`BN001`...) and a short name; both
work with `--select` and `--ignore` (repeat the option or separate with commas) and in the
`select`/`ignore` keys of `[tool.bncli]`. Ids never change meaning; new rules get new ids.
The same text is in the tool: `bncli rules` lists the rules, `bncli rules BN004` (or
`bncli rules collapsed-variance`) explains one, `--format json` for scripts.
"""

AFTER_TABLE = """\
Severities: `error` means the layer is broken (eval outputs are wrong), `warning` that it
probably misbehaves in deployment, `info` that it is worth a look. `--fail-on` (default
`error`) picks the lowest severity that makes the exit status 1.

BN017-BN019 are *live* rules: `bncli.watch(model, optimizer)` and the Lightning callback
`bncli.lightning.BatchNormWatch` raise them while a model trains, with the step and the layer
(BN001 and BN002 too: at the forward that makes the statistics NaN, Inf or negative); `inspect`
never runs them. See docs/watch.md.

When a layer's tensors have different lengths (BN006) the per-channel rules cannot line the
channels up, so they are skipped for that layer, even when BN006 itself is ignored.
"""


def by_id() -> list[Rule]:
    return sorted(RULES, key=lambda r: r.id)


def _options(rule: Rule) -> list[str]:
    return ["--" + t.replace("_", "-") for t in rule.thresholds]


def _severity(rule: Rule) -> str:
    return rule.severity.value + (f" ({rule.severity_note})" if rule.severity_note else "")


def _wrap(text: str, width: int, indent: str = "") -> str:
    return textwrap.fill(
        text, width=width, initial_indent=indent, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


# ---- markdown (docs/rules.md) -------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_section(rule: Rule) -> str:
    lines = [
        f"## {rule.id} {rule.name}",
        "",
        f"- Severity: {_severity(rule)}",
        f"- Thresholds: {rule.thresholds_note or 'none'}",
        "",
        _wrap(f"**What it detects.** {rule.detects}", 95),
        "",
        _wrap(f"**Why it matters.** {rule.why}", 95),
        "",
        "**Example.**",
        "",
        *(f"    {line}" for line in rule.example),
        "",
        _wrap(f"**How to fix.** {rule.fix}", 95),
    ]
    return "\n".join(lines) + "\n"


def markdown(rules: list[Rule] | None = None) -> str:
    """docs/rules.md for the whole catalogue; one rule's section when `rules` names one."""
    if rules is not None and len(rules) == 1:
        return markdown_section(rules[0]).rstrip("\n")
    rules = rules or by_id()
    table = ["| id | name | severity | thresholds | summary |", "|---|---|---|---|---|"]
    for rule in rules:
        options = ", ".join(f"`{o}`" for o in _options(rule))
        table.append(f"| {rule.id} | {rule.name} | {_cell(_severity(rule))} | {options} | {_cell(rule.summary)} |")
    parts = [INTRO, "\n".join(table) + "\n", AFTER_TABLE, "---\n", *(markdown_section(r) for r in rules)]
    return "\n".join(parts).rstrip("\n")


# ---- JSON ---------------------------------------------------------------------------------------------------------


def as_dict(rule: Rule) -> dict:
    return {
        "id": rule.id,
        "name": rule.name,
        "severity": rule.severity.value,
        "severity_note": rule.severity_note or None,
        "scope": rule.scope,
        "summary": rule.summary,
        "thresholds": _options(rule),
        "thresholds_note": rule.thresholds_note or None,
        "detects": rule.detects,
        "why": rule.why,
        "fix": rule.fix,
        "example": list(rule.example),
        "help_uri": rule.help_uri,
    }


def as_json(rules: list[Rule] | None = None) -> str:
    """{"schema_version": 1, "rules": [...]} (docs/schema/rules.json), the same shape for one rule or all."""
    return json.dumps({"schema_version": SCHEMA_VERSION, "rules": [as_dict(r) for r in rules or by_id()]}, indent=2, ensure_ascii=False)


# ---- text (a terminal) --------------------------------------------------------------------------------------------


def _plain(text: str) -> str:
    return text.replace("`", "")


def listing(width: int | None = None) -> str:
    """One line per rule: id, name, severity, summary; the summary wraps (at words, indented) to `width`."""
    rules = by_id()
    name_w = max(len(r.name) for r in rules)
    indent = 6 + 1 + name_w + 2 + 8 + 2
    room = max(30, (width or 10_000) - indent)
    lines = [f"{'id':<6} {'name':<{name_w}}  {'severity':<8}  summary"]
    for r in rules:
        summary = textwrap.wrap(r.summary, room, break_long_words=False, break_on_hyphens=False) or [""]
        lines.append(f"{r.id:<6} {r.name:<{name_w}}  {r.severity.value:<8}  {summary[0]}")
        lines.extend(" " * indent + more for more in summary[1:])
    lines.append(f"{len(rules)} rules; `bncli rules ID` (or NAME) says what one detects, why it matters and how to fix it.")
    return "\n".join(lines)


def explain(rule: Rule, width: int = 100) -> str:
    """One rule in full, wrapped to `width`."""
    width = max(40, min(width, 100))
    lines = [
        f"{rule.id} {rule.name}",
        f"severity: {_plain(_severity(rule))}",
        _wrap(f"thresholds: {_plain(rule.thresholds_note) or 'none'}", width),
        "",
        _wrap(f"What it detects. {_plain(rule.detects)}", width),
        "",
        _wrap(f"Why it matters. {_plain(rule.why)}", width),
        "",
        "Example:",
        *(f"    {line}" for line in rule.example),
        "",
        _wrap(f"How to fix. {_plain(rule.fix)}", width),
        "",
        f"More: {rule.help_uri}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
