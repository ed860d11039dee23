"""The conventions of the linters next to bncli: -V, shell completion, --quiet, --config PATH, --isolated, and
[tool.bncli] (with its diff table) read by diff too."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLES

from bncli import __version__

A, B = SAMPLES / "model.pt", SAMPLES / "model_defects.pt"


def test_short_version(cli):
    for flag in ("-V", "--version"):
        result = cli(flag)
        assert result.exit_code == 0 and result.stdout == f"bncli {__version__}\n"


def test_shell_completion_is_offered(cli):
    help_text = cli("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    result = cli("--show-completion", "bash")
    assert result.exit_code == 0, result
    assert "complete" in result.stdout and "_BNCLI_COMPLETE" in result.stdout.upper()


def test_quiet_prints_only_the_summary_and_keeps_errors_and_exit_codes(cli, tmp_path):
    full = cli("inspect", B)
    quiet = cli("inspect", B, "-q")
    assert quiet.exit_code == full.exit_code == 1
    assert quiet.stdout.splitlines() == [full.stdout.splitlines()[-1]]
    missing = cli("inspect", tmp_path / "nope.pt", B, "--quiet")
    assert missing.exit_code == 3 and missing.stderr.startswith("error: ") and len(missing.stdout.splitlines()) == 1
    assert json.loads(cli("inspect", B, "-q", "-f", "json").stdout)["schema_version"] == 1  # formats for programs stay whole
    d = cli("diff", A, B, "-q")
    assert d.exit_code == 0 and len(d.stdout.splitlines()) == 1
    assert d.stdout.splitlines()[0] in cli("diff", A, B).stdout.splitlines()


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.bncli]\nfail-on = "never"\n')
    return tmp_path


def test_isolated_ignores_the_project_settings(cli, project):
    assert cli("inspect", B).exit_code == 0  # fail-on = never from the pyproject.toml
    assert cli("inspect", B, "--isolated").exit_code == 1  # the default, error


def test_config_names_the_settings_file(cli, project):
    (project / "strict.toml").write_text('fail-on = "info"\n')  # a bncli settings file: keys at the top level
    assert cli("inspect", A, "--config", project / "strict.toml").exit_code == 0  # the clean sample has no finding
    (project / "other").mkdir()
    (project / "other" / "pyproject.toml").write_text('[tool.bncli]\nfail-on = "error"\n')
    assert cli("inspect", B, "--config", project / "other" / "pyproject.toml").exit_code == 1
    missing = cli("inspect", B, "--config", project / "nope.toml")
    assert missing.exit_code == 2 and missing.stderr == f"error: --config {project / 'nope.toml'}: no such file\n"
    bad = project / "bad.toml"
    bad.write_text("fail-onn = 1\n")
    result = cli("inspect", B, "--config", bad)
    assert result.exit_code == 2 and "unknown key 'fail-onn' in the file" in result.stderr


def test_diff_reads_its_table_and_the_shared_eps(cli, project):
    (project / "pyproject.toml").write_text(
        '[tool.bncli]\neps = 0.5\n[tool.bncli.diff]\nformat = "json"\nfail-on-change = true\n'
    )
    result = cli("diff", A, B)
    assert result.exit_code == 1  # fail-on-change from the file; the three layers differ
    payload = json.loads(result.stdout)  # format from the file
    assert payload["eps"] == 0.5 and payload["gate"]["option"] == "fail-on-change"
    assert not cli("diff", A, B, "--format", "table").stdout.startswith("{")  # the option wins over the file
    assert cli("diff", A, B, "--isolated").exit_code == 0
    assert json.loads(cli("diff", A, B, "--eps", "1e-3").stdout)["eps"] == 1e-3  # the option wins


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[tool.bncli.diff]\nformt = "json"\n', "unknown key 'formt' in [tool.bncli.diff]"),
        ("[tool.bncli.diff]\natol = -1\n", "[tool.bncli.diff] atol must be a number >= 0"),
        ('[tool.bncli.diff]\nfail-on-change = "yes"\n', "[tool.bncli.diff] fail-on-change must be true or false"),
        ('[tool.bncli.diff]\nformat = "xml"\n', "[tool.bncli.diff] format must be one of table, json, markdown, github, sarif"),
    ],
)
def test_a_bad_diff_table_is_a_usage_error(cli, project, table, message):
    (project / "pyproject.toml").write_text(table)
    result = cli("diff", A, B)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
