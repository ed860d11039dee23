"""[tool.bncli] in the nearest pyproject.toml: found upward from the working directory, validated, and overridden by options."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

import bncli.config as config_mod
from bncli.config import Config, ConfigError, find_pyproject, load_config, resolve_inspect
from bncli.rules import ALL_IDS, Thresholds


def write(folder, text: str):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pyproject.toml"
    path.write_text(text)
    return path


def test_nearest_pyproject_upward(tmp_path):
    outer = write(tmp_path, "[tool.bncli]\nfail-on = 'info'\n")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert find_pyproject(deep) == outer
    inner = write(tmp_path / "a", "[project]\nname = 'x'\n")
    assert find_pyproject(deep) == inner
    # The nearest file wins even without a [tool.bncli] table, as ruff and black do.
    assert load_config(deep).values == {}


def test_values_are_read_with_dashes_or_underscores(tmp_path):
    write(tmp_path, "[tool.bncli]\nfail_on = 'warning'\nmax-var = 1e6\nignore = ['BN005']\nrequire-bn = true\nselect = 'BN001'\n")
    cfg = load_config(tmp_path)
    assert cfg.path == tmp_path / "pyproject.toml"
    assert cfg.values == {"fail-on": "warning", "max-var": 1e6, "ignore": ["BN005"], "require-bn": True, "select": "BN001"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[tool.bncli]\nfail-onn = 'x'\n", "unknown key 'fail-onn' in [tool.bncli]; known keys: fail-on, format, select"),
        ("[tool.bncli]\neps = 'small'\n", "[tool.bncli] eps must be a number >= 0; got 'small'"),
        ("[tool.bncli]\nrequire-bn = 1\n", "[tool.bncli] require-bn must be true or false; got 1"),
        ("[tool.bncli]\nmax-var = true\n", "[tool.bncli] max-var must be a number > 0; got True"),
        ("[tool.bncli]\nignore = [5]\n", "[tool.bncli] ignore must be a list of rule ids or names; got [5]"),
        ("[tool.bncli\n", "cannot read it: "),
        ("[tool]\nbncli = 3\n", "[tool.bncli] must be a table"),
    ],
)
def test_bad_tables_are_usage_errors(tmp_path, text, message):
    write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.message.startswith(f"{tmp_path / 'pyproject.toml'}: ")
    assert message in info.value.message
    assert info.value.exit_code == 2


def test_defaults_without_any_config():
    s = resolve_inspect({}, Config())
    assert (s.fail_on, s.format, s.selected, s.require_bn, s.thresholds) == ("error", "table", ALL_IDS, False, Thresholds())


def test_options_win_over_the_file_which_wins_over_defaults(tmp_path):
    cfg = Config(tmp_path / "pyproject.toml", {"fail-on": "info", "max-var": 1e6, "eps": 1e-3, "ignore": ["BN005"]})
    s = resolve_inspect({"fail-on": "never", "eps": 1e-4, "ignore": []}, cfg)
    assert s.fail_on == "never"  # option
    assert s.thresholds == Thresholds(eps=1e-4, max_var=1e6)  # option, file, defaults
    assert "BN005" not in s.selected  # an empty list of options is "not given"


def test_bad_threshold_names_its_source(tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve_inspect({"max-var": -1.0}, Config())
    assert info.value.message == "--max-var: must be a number > 0; got -1"
    cfg = Config(tmp_path / "pyproject.toml", {"eps": -0.001})
    with pytest.raises(ConfigError) as info:
        resolve_inspect({}, cfg)
    assert info.value.message == f"{tmp_path / 'pyproject.toml'} [tool.bncli] eps: must be a number >= 0; got -0.001"
    assert resolve_inspect({}, Config(tmp_path / "pyproject.toml", {"eps": 0})).thresholds.eps == 0.0  # FrozenBatchNorm2d
    with pytest.raises(ConfigError) as info:
        resolve_inspect({}, Config(tmp_path / "pyproject.toml", {"fail-on": "warnings"}))
    assert info.value.message.endswith("[tool.bncli] fail-on: 'warnings' is not one of error, warning, info, never")


def test_python_310_without_tomli_warns_and_skips(tmp_path, monkeypatch):
    write(tmp_path, "[tool.bncli]\nfail-on = 'info'\n")
    monkeypatch.setattr(config_mod, "_toml", lambda: None)
    cfg = load_config(tmp_path)
    assert cfg.values == {}
    expected = f"{tmp_path / 'pyproject.toml'}: [tool.bncli] ignored: reading TOML on Python 3.10 needs `pip install tomli`"
    assert cfg.warnings == (expected,)


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture
def defects(tmp_path):
    from conftest import SAMPLES

    return SAMPLES / "model_defects.pt"


def test_cli_reads_the_config_of_the_working_directory(cli, tmp_path, monkeypatch, defects):
    write(tmp_path, "[tool.bncli]\nselect = ['dead-channel']\nformat = 'json'\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    result = cli("inspect", defects)
    assert result.exit_code == 0, result  # only the info finding is selected; fail-on error
    assert [f["rule"] for f in json.loads(result.stdout)["files"][0]["findings"]] == ["BN005"]
    result = cli("inspect", defects, "--select", "BN003", "--fail-on", "info")  # options win
    assert result.exit_code == 1
    assert [f["rule"] for f in json.loads(result.stdout)["files"][0]["findings"]] == ["BN003"]


def test_cli_config_fail_on_and_thresholds(cli, tmp_path, monkeypatch, defects):
    write(tmp_path, "[tool.bncli]\nfail-on = 'never'\ndead-weight = 1e-6\nformat = 'json'\n")
    monkeypatch.chdir(tmp_path)
    result = cli("inspect", defects)
    assert result.exit_code == 0, result
    assert "BN005" not in [f["rule"] for f in json.loads(result.stdout)["files"][0]["findings"]]
    assert cli("inspect", defects, "--fail-on", "error").exit_code == 1


def test_cli_bad_config_is_one_error_line_exit_2(cli, tmp_path, monkeypatch, defects):
    write(tmp_path, "[tool.bncli]\nfail-on = 3\n")
    monkeypatch.chdir(tmp_path)
    result = cli("inspect", defects)
    assert result.exit_code == 2
    expected = f"{tmp_path / 'pyproject.toml'}: [tool.bncli] fail-on must be one of error, warning, info, never; got 3"
    assert result.stderr == f"error: {expected}\n"
    assert result.stdout == ""


def test_cli_no_require_bn_overrides_the_file(cli, tmp_path, monkeypatch):
    from conftest import SAMPLES

    write(tmp_path, "[tool.bncli]\nrequire-bn = true\n")
    monkeypatch.chdir(tmp_path)
    assert cli("inspect", SAMPLES / "inputs.safetensors").exit_code == 1
    assert cli("inspect", SAMPLES / "inputs.safetensors", "--no-require-bn").exit_code == 0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is new in Python 3.11")
def test_toml_reader_per_python_version(monkeypatch):
    tomllib = importlib.import_module("tomllib")
    assert config_mod._toml() is tomllib
    monkeypatch.setattr(sys, "version_info", (3, 10, 12))
    monkeypatch.setitem(sys.modules, "tomli", None)  # makes `import tomli` raise ImportError
    assert config_mod._toml() is None
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # stands in for the installed backport
    assert config_mod._toml() is tomllib


def test_max_fold_spread_from_the_config_and_the_option(cli, tmp_path, monkeypatch, defects):
    """features.5 of the defects sample spreads 224.8x: reported at the default 100, not at 300 (file), again at 200 (option)."""

    def fold_risk(result) -> list[str]:
        return [f["layer"] for f in json.loads(result.stdout)["files"][0]["findings"] if f["rule"] == "BN015"]

    assert fold_risk(cli("inspect", defects, "-f", "json")) == ["features.5"]
    write(tmp_path, "[tool.bncli]\nmax-fold-spread = 300\nformat = 'json'\n")
    monkeypatch.chdir(tmp_path)
    assert fold_risk(cli("inspect", defects)) == []
    assert fold_risk(cli("inspect", defects, "--max-fold-spread", "200")) == ["features.5"]
    assert fold_risk(cli("inspect", defects, "--max-fold-spread", "225")) == []
    bad = cli("inspect", defects, "--max-fold-spread", "0")
    assert (bad.exit_code, bad.stderr) == (2, "error: --max-fold-spread: must be a number > 0; got 0\n")
    write(tmp_path, "[tool.bncli]\nmax-fold-spread = 'big'\n")
    bad = cli("inspect", defects)
    assert bad.exit_code == 2
    assert bad.stderr.endswith("[tool.bncli] max-fold-spread must be a number > 0; got 'big'\n")
