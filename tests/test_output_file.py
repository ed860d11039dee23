"""--output-file/-o: the report goes to a file, atomically, with the exit code unchanged; --summary appends markdown."""

from __future__ import annotations

import json
import os

import pytest
from conftest import SAMPLES


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip("\n").splitlines()]


@pytest.mark.parametrize("fmt", ["json", "table", "markdown", "github", "sarif"])
def test_inspect_report_in_a_file_is_what_stdout_gets(tmp_path, fmt):
    from typer.testing import CliRunner

    from bncli.cli import app
    from bncli.delivery import FILE_WIDTH

    runner = CliRunner(env={"NO_COLOR": "1", "COLUMNS": str(FILE_WIDTH), "TERM": "dumb"})  # a piped stdout's width
    out = tmp_path / "report.txt"
    args = [str(SAMPLES / "model_defects.pt"), "--format", fmt]
    to_file = runner.invoke(app, ["inspect", *args, "-o", str(out)])
    to_stdout = runner.invoke(app, ["inspect", *args])
    assert to_file.exit_code == to_stdout.exit_code == 1  # the findings' exit code, kept
    assert to_file.stdout == ""
    assert to_file.stderr == to_stdout.stderr
    if fmt in ("json", "sarif"):
        assert json.loads(out.read_text()) == json.loads(to_stdout.stdout)
    else:
        assert _lines(out.read_text()) == _lines(to_stdout.stdout)
    assert not any(line != line.rstrip() for line in out.read_text().splitlines())


def test_replaces_the_file_atomically_and_keeps_it_on_failure(cli, tmp_path, monkeypatch):
    out = tmp_path / "report.json"
    out.write_text("old\n")
    assert cli("inspect", SAMPLES / "model.pt", "-f", "json", "--output-file", out).exit_code == 0
    assert json.loads(out.read_text())["schema_version"] == 1

    out.write_text("old\n")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    result = cli("inspect", SAMPLES / "model.pt", "-f", "json", "-o", out)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {out}: cannot write")
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left


def test_a_missing_folder_is_an_input_error(cli, tmp_path):
    result = cli("rules", "-o", tmp_path / "no" / "rules.txt")
    assert result.exit_code == 3 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1


def test_diff_keeps_its_gate_exit_code(cli, tmp_path):
    out = tmp_path / "diff.json"
    result = cli("diff", SAMPLES / "model.pt", SAMPLES / "model_defects.pt", "--fail-on-change", "-f", "json", "-o", out)
    assert result.exit_code == 1 and result.stdout == ""
    assert json.loads(out.read_text())["schema_version"] == 1


def test_rules_to_a_file(cli, tmp_path):
    out = tmp_path / "rules.md"
    assert cli("rules", "--format", "markdown", "-o", out).exit_code == 0
    assert out.read_text().startswith("# bncli inspect: the rules\n")


def test_github_annotations_and_a_markdown_summary_in_one_run(cli, tmp_path):
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    result = cli("inspect", SAMPLES / "model_defects.pt", "--format", "github", "--summary", summary)
    assert result.exit_code == 1
    assert result.stdout.startswith("::error file=")
    markdown = cli("inspect", SAMPLES / "model_defects.pt", "--format", "markdown").stdout
    assert summary.read_text() == "earlier step\n" + markdown.rstrip("\n") + "\n\n"  # appended, as >> would
    again = cli("diff", SAMPLES / "model.pt", SAMPLES / "model_defects.pt", "--summary", summary)
    assert again.exit_code == 0
    assert summary.read_text().count("\n## ") >= 1 and summary.read_text().startswith("earlier step\n## bncli inspect")


def test_normalize_writes_the_tensor_and_the_report(cli, tmp_path):
    tensor, report = tmp_path / "out.pt", tmp_path / "report.json"
    result = cli("normalize", SAMPLES / "input.pt", "--output", tensor, "--output-file", report, "-f", "json")
    assert result.exit_code == 0, result
    assert result.stdout == ""
    assert tensor.exists() and json.loads(report.read_text())["output"] == str(tensor)
    clash = cli("normalize", SAMPLES / "input.pt", "--output", tensor, "--output-file", tensor)
    assert clash.exit_code == 2 and "name the same file" in clash.stderr
