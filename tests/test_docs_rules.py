"""docs/rules.md is generated from the catalogue in bncli/rules.py: the same rules, severities, thresholds and real messages."""

from __future__ import annotations

import re

from conftest import ROOT

from bncli import ruledoc
from bncli.rules import RULES

DOC = (ROOT / "docs" / "rules.md").read_text()


def sections() -> dict[str, str]:
    parts = re.split(r"^## ", DOC, flags=re.M)[1:]
    return {part.splitlines()[0].strip(): part for part in parts}


def test_one_section_per_rule_and_no_other():
    assert list(sections()) == [f"{r.id} {r.name}" for r in sorted(RULES, key=lambda r: r.id)]


def test_each_section_has_severity_thresholds_and_the_four_parts():
    for rule in RULES:
        text = sections()[f"{rule.id} {rule.name}"]
        assert re.search(rf"^- Severity: {rule.severity.value}\b", text, re.M), rule.id
        thresholds = re.search(r"^- Thresholds: (.*)$", text, re.M)
        assert thresholds, rule.id
        documented = set(re.findall(r"`(--[a-z-]+)`", thresholds.group(1)))
        assert documented == {"--" + t.replace("_", "-") for t in rule.thresholds}, rule.id
        for part in ("**What it detects.**", "**Why it matters.**", "**Example.**", "**How to fix.**"):
            assert part in text, (rule.id, part)
        assert f"{rule.id} {rule.name}" in text.split("**Example.**")[1].split("**How to fix.**")[0], rule.id


def test_summary_table_matches_the_code():
    rows = re.findall(r"^\| (BN\d{3}) \| ([a-z-]+) \| ([a-z]+)", DOC, re.M)
    assert rows == [(r.id, r.name, r.severity.value) for r in sorted(RULES, key=lambda r: r.id)]


def test_threshold_options_exist_on_the_command(cli):
    out = cli("inspect", "--help").stdout
    for rule in RULES:
        for t in rule.thresholds:
            assert "--" + t.replace("_", "-") in out


def test_examples_are_real_output():
    """The examples for the sample's defects are the exact lines `bncli inspect` prints for them."""
    from conftest import SAMPLES

    from bncli.audit import inspect_files

    findings = inspect_files([SAMPLES / "model_defects.pt"]).findings
    assert len(findings) == 6
    for f in findings:
        assert f"    {f.severity.value:<8}{f.rule} {f.name} {f.layer}: {f.message}\n" in DOC


def test_the_page_is_the_catalogue():
    """Edit the rule in bncli/rules.py, then `python3 -m bncli.ruledoc > docs/rules.md`."""
    assert DOC == ruledoc.markdown() + "\n"


def test_every_rule_has_its_text_and_a_unique_anchor():
    assert len({r.anchor for r in RULES}) == len(RULES)
    for rule in RULES:
        assert rule.summary and rule.detects and rule.why and rule.fix and rule.example, rule.id
        assert rule.help_uri.endswith("docs/rules.md#" + rule.anchor)
        # GitHub's anchor for the section heading "## BN004 collapsed-variance"
        assert f"## {rule.id} {rule.name}\n" in DOC and rule.anchor == f"{rule.id} {rule.name}".lower().replace(" ", "-")


def test_new_rule_examples_are_real_output(make_ckpt):
    """BN013 and BN014's examples are what `bncli inspect` prints for the checkpoints they describe."""
    from conftest import bn_state

    from bncli.audit import inspect_file
    from bncli.rules import rule_by_key

    sd = bn_state(64, prefix="layer1.bn", seed=1)
    sd["layer1.bn.running_mean"][[5, 21, 22]] = 0.0
    sd["layer1.bn.running_var"][[5, 21, 22]] = 1.0
    for prefix, seed in (("backbone.bn1", 2), ("ema.bn1", 2), ("head.bn", 3)):
        sd.update(bn_state(64, prefix=prefix, seed=seed))
    lines = [f"{f.severity.value:<8}{f.rule} {f.name} {f.layer}: {f.message}" for f in inspect_file(make_ckpt(sd)).findings]
    assert lines == [rule_by_key("BN013").example[0], rule_by_key("BN014").example[0]]
