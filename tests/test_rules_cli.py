"""`bncli rules`: the catalogue from the package (listing, one rule by id or name, JSON, markdown), and its registry."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from bncli import ruledoc
from bncli.report import Severity
from bncli.rules import RULES, rule


def test_lists_every_rule_once_in_id_order(cli):
    result = cli("rules")
    assert result.exit_code == 0, result
    rows = [line.split()[:3] for line in result.stdout.splitlines() if line.startswith("BN")]
    assert rows == [[r.id, r.name, r.severity.value] for r in sorted(RULES, key=lambda r: r.id)]
    assert f"{len(RULES)} rules" in result.stdout


@pytest.mark.parametrize("key", ["BN004", "bn004", "collapsed-variance"])
def test_explains_one_rule_by_id_or_name(cli, key):
    result = cli("rules", key)
    assert result.exit_code == 0, result
    out = result.stdout
    assert out.startswith("BN004 collapsed-variance\nseverity: warning\n")
    for part in ("What it detects.", "Why it matters.", "Example:", "How to fix.", "#bn004-collapsed-variance"):
        assert part in out
    assert "`" not in out  # markdown code marks are for the page, not the terminal
    assert "BN005" not in out.split("How to fix.")[0]  # only this rule


def test_explanation_wraps_at_the_terminal_width(cli, monkeypatch):
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: __import__("os").terminal_size((60, 24)))
    out = cli("rules", "BN001").stdout
    prose = [line for line in out.splitlines() if not line.startswith(("    ", "More:"))]
    assert max(len(line) for line in prose) <= 60


def test_json_has_every_field_for_all_or_one(cli):
    every = json.loads(cli("rules", "--format", "json").stdout)
    assert every["schema_version"] == 1
    assert [r["id"] for r in every["rules"]] == sorted(r.id for r in RULES)
    one = json.loads(cli("rules", "dead-channel", "-f", "json").stdout)
    (entry,) = one["rules"]
    assert entry["id"] == "BN005" and entry["severity"] == "info" and entry["thresholds"] == ["--dead-weight"]
    assert entry["help_uri"].endswith("#bn005-dead-channel")
    assert entry["example"][0].startswith("info    BN005 dead-channel")
    assert entry == next(r for r in every["rules"] if r["id"] == "BN005")


def test_markdown_is_the_documentation_page(cli):
    assert cli("rules", "--format", "markdown").stdout == (ROOT / "docs" / "rules.md").read_text()
    section = cli("rules", "BN002", "--format", "markdown").stdout
    assert section.startswith("## BN002 negative-variance\n") and "## BN003" not in section


def test_unknown_rule_is_a_usage_error_with_the_nearest_names(cli):
    result = cli("rules", "BN44")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown rule 'BN44'; did you mean BN014, BN004")
    assert result.stdout == ""


def test_the_registry_refuses_a_taken_id_and_a_rule_without_its_text():
    text = {"detects": "d", "why": "w", "fix": "f", "example": ("e",)}
    with pytest.raises(ValueError, match="already taken"):
        rule("BN001", "something-new", Severity.INFO, "s", **text)(lambda layer, t: [])
    with pytest.raises(ValueError, match="already taken"):
        rule("BN999", "non-finite", Severity.INFO, "s", **text)(lambda layer, t: [])
    with pytest.raises(ValueError, match="required"):
        rule("BN999", "something-new", Severity.INFO, "s", detects="d", why="w", fix="f")(lambda layer, t: [])
    assert [r.id for r in RULES].count("BN999") == 0 and len({r.id for r in RULES}) == len(RULES)


def test_explain_and_listing_cover_the_catalogue():
    assert all(ruledoc.explain(r).startswith(f"{r.id} {r.name}\n") for r in RULES)
    assert all(r.id in ruledoc.listing() for r in RULES)


def test_listing_wraps_the_summary_at_80_columns_and_not_when_wide():
    from bncli.ruledoc import listing

    narrow = listing(80)
    assert max(len(line) for line in narrow.splitlines()[:-1]) <= 80
    rows = [line.split()[:3] for line in narrow.splitlines() if line.startswith("BN")]
    assert rows == [[r.id, r.name, r.severity.value] for r in sorted(RULES, key=lambda r: r.id)]
    assert all(len(line.split("  ")) for line in narrow.splitlines())
    wide = listing(None)
    assert len([line for line in wide.splitlines() if line.startswith("BN")]) == len(wide.splitlines()) - 2
