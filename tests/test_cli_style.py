"""The command line in a person's words: metavars, one default style, Click-style value errors without pydantic,
--debug anywhere; and no pydantic (typer 0.29's coercion) on the way to a report."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer
from conftest import ROOT, SAMPLES

from bncli.cli import app
from bncli.clistyle import Convert, Debug, strip_debug

COMMANDS = ("inspect", "diff", "normalize", "recalibrate", "rules")


@pytest.fixture(autouse=True)
def _no_debug_left():
    yield
    Debug.on = False


def test_every_parameter_gets_the_click_style_conversion():
    """A parameter of a type Convert does not know would fall back to typer's pydantic coercion."""
    group = typer.main.get_command(app)
    group.get_params(group.make_context("bncli", ["--help"], resilient_parsing=True))
    assert len(group._converted) >= 5 and group.unconverted == []  # --version, --debug, completion, --help
    for name in COMMANDS:
        command = group.commands[name]
        command.get_params(command.make_context(name, ["--help"], resilient_parsing=True))
        assert len(command._converted) == len(command.params) + 1 and command.unconverted == [], name


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_no_internal_type_names_and_one_default_style(cli, name):
    out = cli(name, "--help").stdout
    assert not re.search(r"<[a-z]|\{[a-zA-Z]", out), out  # <list[str]>, <int range>, {input}, {a} {b}
    assert "(default:" not in out
    assert "Value error" not in out


def test_usage_lines_and_metavars(cli):
    usage = {name: cli(name, "--help").stdout.splitlines()[0] for name in COMMANDS}
    assert usage["inspect"].endswith(" inspect [OPTIONS] PATH...")
    assert usage["diff"].endswith(" diff [OPTIONS] A B")
    assert usage["normalize"].endswith(" normalize [OPTIONS] TENSOR")
    assert usage["recalibrate"].endswith(" recalibrate [OPTIONS] CHECKPOINT")
    assert usage["rules"].endswith(" rules [OPTIONS] [RULE]")
    recal = cli("recalibrate", "--help").stdout
    assert "-n, --num-samples N " in recal and "--model-kwargs JSON " in recal and "-d, --data PATH " in recal
    inspect = cli("inspect", "--help").stdout
    assert "-f, --format [table|json|markdown|github|sarif]" in inspect
    assert re.search(r"--eps FLOAT +The layers' eps in 1/sqrt\(var \+ eps\)\.\s+\[default: 1e-5\]", inspect)


def test_defaults_in_one_style_across_commands(cli):
    for name in ("inspect", "diff", "normalize", "recalibrate"):
        out = cli(name, "--help").stdout
        assert re.search(r"Output format[^\[]*\[default: table\]", out.replace("\n", " ")), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("inspect", "x.pt", "--format", "jsn"), "'jsn' is not one of table, json, markdown, github, sarif."),
        (("diff", "a.pt", "b.pt", "--format", "jsn"), "'jsn' is not one of table, json, markdown, github, sarif."),
        (("normalize", "x.pt", "--format", "jsn"), "'jsn' is not one of table, json."),
        (("inspect", "x.pt", "--fail-on", "warn"), "'warn' is not one of error, warning, info, never."),
        (("inspect", "x.pt", "--max-var", "big"), "'big' is not a valid number."),
        (("inspect", "x.pt", "--eps", "١"), "'١' is not a valid number."),  # an Arabic-Indic digit
        (("recalibrate", "x.pt", "-m", "a:b", "-d", "x", "-o", "y", "-n", "abc"), "'abc' is not a valid integer."),
        (("recalibrate", "x.pt", "-m", "a:b", "-d", "x", "-o", "y", "-b", "0"), "0 is not in the range x>=1."),
        (("normalize", "x.pt", "--mode", "test"), "'test' is not one of train, eval."),
    ],
)
def test_value_errors_in_clicks_words_on_one_line(cli, args, message):
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: invalid value for '") and message in line
    assert "Value error" not in line and "Input should" not in line
    assert line.endswith(f" {args[0]} --help')")


def test_unknown_option_and_missing_argument_are_one_line(cli):
    for args in (("inspect", "x.pt", "--formt", "json"), ("diff", "a.pt"), ("nope",)):
        result = cli(*args)
        assert result.exit_code == 2, args
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("where", ["before", "after", "env"])
def test_debug_anywhere_or_from_the_environment(where, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setattr("bncli.audit.inspect_files", _boom)
    argv = ["inspect", str(SAMPLES / "model.pt")]
    env = {"NO_COLOR": "1", "COLUMNS": "200"}
    if where == "before":
        argv = ["--debug", *argv]
    elif where == "after":
        argv = [*argv, "--debug"]
    else:
        env["BNCLI_DEBUG"] = "1"
    result = CliRunner(env=env).invoke(app, argv)
    assert result.exit_code == 4
    assert "Traceback" in result.stderr and "RuntimeError: boom" in result.stderr
    assert result.stderr.rstrip().endswith("error: internal error: RuntimeError: boom (rerun with --debug for the traceback)")


def test_without_debug_an_internal_error_is_one_line(cli, monkeypatch):
    monkeypatch.setattr("bncli.audit.inspect_files", _boom)
    result = cli("inspect", SAMPLES / "model.pt")
    assert result.exit_code == 4
    assert result.stderr == "error: internal error: RuntimeError: boom (rerun with --debug for the traceback)\n"


def test_strip_debug_stops_at_double_dash():
    assert strip_debug(["inspect", "--debug", "a.pt"]) == (["inspect", "a.pt"], True)
    assert strip_debug(["inspect", "--", "--debug"]) == (["inspect", "--", "--debug"], False)
    assert strip_debug(["inspect", "a.pt"]) == (["inspect", "a.pt"], False)


def test_convert_matches_click_for_plain_values():
    from pathlib import Path
    from typing import Optional

    from bncli.render import Format

    class P:
        multiple, nargs = False, 1

    assert Convert(float).one("1e-5", P(), None) == 1e-5
    assert Convert(Optional[int]).one("12", P(), None) == 12
    assert Convert(Path).one("a/b", P(), None) == Path("a/b")
    assert Convert(Format).one("json", P(), None) is Format.JSON
    assert Convert(Format).one(Format.TABLE, P(), None) is Format.TABLE
    many = P()
    many.multiple = True
    assert Convert(list[str]).coerce(("a", "b"), many, None) == ["a", "b"]
    assert Convert(list[str]).coerce(None, many, None) == ()
    with pytest.raises(typer.BadParameter, match="not in the range 1<=x<=3"):
        Convert(int, minimum=1, maximum=3).one("4", P(), None)


def test_inspect_of_safetensors_imports_neither_pydantic_nor_torch():
    code = (
        "import sys, contextlib, io\n"
        f"sys.argv = ['bncli', 'inspect', {str(SAMPLES / 'model.safetensors')!r}, '--format', 'json']\n"
        "from bncli.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main()\n    except SystemExit as exc:\n        code = exc.code\n"
        "print(code, sorted(m for m in ('pydantic', 'typer._adapters', 'torch') if m in sys.modules))\n"
    )
    if not (SAMPLES / "model.safetensors").exists():
        pytest.skip("no safetensors sample")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split(None, 1) == ["0", "[]\n"], out.stderr[-2000:]


def test_format_help_lists_only_what_the_command_writes(cli):
    assert "-f, --format [table|json]" in cli("normalize", "--help").stdout
    assert "-f, --format [table|json|markdown|github|sarif]" in cli("diff", "--help").stdout
