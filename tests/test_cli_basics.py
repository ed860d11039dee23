"""The CLI shell: help and version without heavy imports, `python -m bncli`, errors as one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLES

from bncli import __version__

HEAVY = ("torch", "numpy", "safetensors")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "--help"], ["normalize", "--help"]])
def test_help_and_version_import_no_torch(args):
    code = (
        "import sys\n"
        "from bncli.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY=", proc.stdout


@pytest.mark.parametrize("command", ["inspect", "normalize"])
def test_each_help_shows_an_example(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and f"bncli {command} " in result.stdout


def test_normalize_help_says_how_std_is_computed(cli):
    assert "correction=1" in cli("normalize", "--help").stdout


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"bncli {__version__}"


def test_python_dash_m():
    proc = subprocess.run(
        [sys.executable, "-m", "bncli", "inspect", str(SAMPLES / "model_defects.safetensors"), "-f", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert '"schema_version": 1' in proc.stdout


def test_missing_checkpoint_is_one_line_exit_3(cli, tmp_path):
    result = cli("inspect", tmp_path / "missing.pt")
    assert result.exit_code == 3
    assert result.stderr == f"error: {tmp_path / 'missing.pt'}: no such file\n"


def test_exit_codes_are_documented():
    from bncli.errors import ExitCode

    readme = (ROOT / "README.md").read_text()
    for code in ExitCode:
        assert f"| {int(code)} |" in readme, f"exit code {int(code)} ({code.name}) missing from the README table"
