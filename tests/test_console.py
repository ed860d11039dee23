"""Nothing from a file changes what a terminal, a CI log or a markdown page shows; stdout and stderr failures are exit 3.

Checkpoints and file names built here hold newlines followed by workflow commands, ESC sequences, Rich markup,
backticks, HTML, @mentions, U+2028 and lone surrogates; every format and stderr must show them escaped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import OrderedDict

import pytest
from conftest import ROOT, SAMPLES, bn_state

from bncli import console

HOSTILE = [
    "bn\n::stop-commands::x",
    "::error file=x::pwn",
    "esc\x1b[31mred\x1b]8;;http://e\x07",
    "[/x]",
    "[link=https://evil]features.1[/link]",
    "tick`s``more",
    "<img src=x onerror=alert(1)>",
    "@octocat",
    "sep\u2028line\u2029",
    "sur\udcffrogate\ud800",
    "cr\rreturn\x85c1",
]
FILE_NAME = b"ck\n::error::file\x1b[2J\xff.pt"  # a newline, a command, ESC and an undecodable byte
COMMAND = re.compile(r"::(error|warning|notice) [a-z]+=[^:\n]*(,[a-z]+=[^:\n]*)*::")


@pytest.fixture
def hostile(tmp_path):
    """A folder with one checkpoint whose layer names and file name are all hostile; half the layers have a NaN."""
    import torch

    sd = OrderedDict()
    for i, name in enumerate(HOSTILE):
        layer = bn_state(4, prefix=name, seed=i)
        if i % 2 == 0:
            layer[f"{name}.running_var"][1] = float("nan")  # a finding that quotes the name
        sd.update(layer)
    folder = tmp_path / "in"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), FILE_NAME), "wb") as fh:
        torch.save(sd, fh)
    return folder


def assert_inert(output: str, github: bool = False) -> None:
    """No raw control character, separator or surrogate; no line a runner would read as a command, except
    bncli's own annotations in github format (which carry the data escaped)."""
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]", output), output
    for line in output.splitlines():
        plain = line.lstrip()
        if plain.startswith("::"):
            assert github and COMMAND.match(plain), line


def _invoke(args, env=None):
    from typer.testing import CliRunner

    from bncli.cli import app

    return CliRunner(env={"NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb", **(env or {})}).invoke(app, args)


@pytest.mark.parametrize("fmt", ["table", "json", "markdown", "github"])
@pytest.mark.parametrize("columns", ["60", "200"])
def test_hostile_names_are_escaped_in_every_format(hostile, fmt, columns):
    result = _invoke(["inspect", str(hostile), "--format", fmt], env={"COLUMNS": columns})
    assert result.exit_code == 1, result.output  # the NaN findings; never 4
    out = result.stdout
    assert_inert(out, github=fmt == "github")
    assert_inert(result.stderr)
    if fmt == "json":
        names = [layer["name"] for layer in json.loads(out)["files"][0]["layers"]]
        assert names == HOSTILE  # JSON keeps the exact names, escaped by JSON itself
        assert json.loads(out)["files"][0]["path"].endswith(".pt")
        return
    if fmt == "table" and columns == "200":
        for shown in ("[link=https://evil]features.1[/link]", "[/x]", "bn\\n::stop-commands::x", "esc\\x1b[31mred",
                      "sep\\u2028line\\u2029", "sur\\xffrogate\\ud800", "ck\\n::error::file\\x1b[2J\\xff.pt"):
            assert shown in out.replace("\\::", "::"), shown
    if fmt == "markdown":
        spans = re.sub(r"(`+)(.+?)\1", "", out)  # everything outside code spans is bncli's own text or escaped
        assert "<img" not in spans and "@octocat" not in spans and "[link" not in spans
        assert "```tick`s``more```" in out  # fenced longer than its longest backtick run
    if fmt == "github":
        annotations = [line for line in out.splitlines() if line.startswith("::")]
        assert len(annotations) == 6  # one per NaN layer: no newline in a name starts another command
        assert all("\\n" in a or "%0A" not in a for a in annotations)


def test_hostile_names_with_layer_and_unknown_layer(hostile):
    (path,) = list(hostile.iterdir())
    for name in HOSTILE[:6]:
        result = _invoke(["inspect", str(path), "--layer", name])
        assert result.exit_code in (0, 1), result.output
        assert_inert(result.stdout)
        assert console.terminal(name) in result.stdout.replace("\\::", "::")
    missing = _invoke(["inspect", str(path), "--layer", "nope\n::error::x\x1b[2J", "--format", "github"])
    assert missing.exit_code in (2, 3)
    assert_inert(missing.stderr)
    assert_inert(missing.stdout, github=True)


def test_error_lines_on_stderr_are_escaped_in_github_mode(tmp_path):
    name = "gone\n::stop-commands::x\x1b[2J.pt"
    result = _invoke(["inspect", str(tmp_path / name), "--format", "github"])
    assert result.exit_code == 3
    assert_inert(result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert_inert(result.stdout, github=True)


def test_diff_and_normalize_escape_names(tmp_path, make_ckpt):
    sd = OrderedDict()
    for i, name in enumerate(HOSTILE[:6]):
        sd.update(bn_state(4, prefix=name, seed=i))
    a = make_ckpt(sd, "a.pt")
    sd2 = OrderedDict((k, v + 1 if k.endswith("running_mean") else v) for k, v in sd.items())
    sd2.update(bn_state(4, prefix="only\nin b\x1b", seed=9))
    b = make_ckpt(sd2, "b.pt")
    for fmt in ("table", "json", "markdown", "github"):
        result = _invoke(["diff", str(a), str(b), "--format", fmt])
        assert result.exit_code == 0, result.output
        assert_inert(result.stdout, github=fmt == "github")
    one = _invoke(["diff", str(a), str(b), "--layer", HOSTILE[4]])
    assert one.exit_code == 0 and "[link=https://evil]features.1[/link]" in one.stdout


# --------------------------------------------------------------------------- the escaping functions


def test_terminal_shows_every_control_character():
    assert console.terminal("a\nb\rc\td\x1b[2Je\x7f\x85\u2028\u2029\u202e\u200b") == (
        "a\\nb\\rc\\td\\x1b[2Je\\x7f\\x85\\u2028\\u2029\\u202e\\u200b"
    )
    assert console.terminal("file\udcff\ud800") == "file\\xff\\ud800"  # an undecodable byte shows as that byte
    assert console.terminal("plain.name_1 é 日本") == "plain.name_1 é 日本"


def test_rich_never_parses_markup_from_data():
    from rich.console import Console

    out = Console(width=200, no_color=True, file=__import__("io").StringIO())
    out.print(console.text("[link=https://x]features.1[/link] [/x] [bold]b"))
    assert out.file.getvalue().strip() == "[link=https://x]features.1[/link] [/x] [bold]b"


@pytest.mark.parametrize("name", ["a`b", "``x``", "`", "a|b", " x ", "", "end`"])
def test_markdown_code_span_is_fenced_longer_than_any_backtick_run(name):
    span = console.md_code(name)
    fence = re.match("`+", span).group()
    assert span.endswith(fence) and len(fence) > max((len(r) for r in re.findall("`+", name)), default=0)
    inner = span[len(fence):-len(fence)]
    if inner.startswith(" ") and inner.endswith(" ") and inner.strip():
        inner = inner[1:-1]  # CommonMark strips one space each side
    assert inner.replace("\\|", "|") == (name or " ")


def test_markdown_text_has_no_live_markup():
    text = console.md_text("<img src=x> ![i](u) [l](u) @octocat *b* `c` a|b running_mean")
    assert "<" not in text.replace("\\<", "") and "@octocat" not in text and "running_mean" in text
    assert "\\|" in text and "\\`" in text and "\\*" in text and "\\!" in text and "\\[" in text


def test_workflow_escaping():
    assert console.workflow_data("50% a\nb") == "50%25 a\\nb"
    assert console.workflow_property("a:b,c") == "a%3Ab%2Cc"
    assert console.no_command_lines("ok\n::stop-commands::x\n  ::error::y\n\x1b[1m::warning::z") == (
        "ok\n\\::stop-commands::x\n \\::error::y\n\x1b[1m\\::warning::z"
    )


# --------------------------------------------------------------------------- streams (the real CLI)


def _bncli(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    return subprocess.run([sys.executable, "-m", "bncli", *args], cwd=ROOT, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}, **kwargs)


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_a_stdout_that_is_not_utf8_gets_ascii_boxes_and_marks(hostile, encoding):
    defects = str(SAMPLES / "model_defects.pt")
    proc = _bncli("inspect", defects, env={"PYTHONIOENCODING": encoding})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert out.isascii()
    assert "features.5 | 32 |" in out and "#x#_#_##########" in out  # the sparkline with its NaN mark, in ASCII
    (path,) = list(hostile.iterdir())
    for args in ([os.fsdecode(path)], [os.fsdecode(path), "--format", "markdown"], [defects, "--layer", "features.9"]):
        proc = subprocess.run([sys.executable, "-m", "bncli", "inspect", *args], cwd=ROOT, capture_output=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": encoding})
        assert proc.returncode == 1, proc.stderr
        assert proc.stdout.isascii() and proc.stderr == b""
    diff = _bncli("diff", str(SAMPLES / "model.pt"), defects, env={"PYTHONIOENCODING": encoding})
    assert diff.returncode == 0 and diff.stdout.isascii() and "| d batches" not in diff.stdout


def test_closed_stdout_is_one_error_line_exit_3():
    proc = _bncli("inspect", str(SAMPLES / "model.pt"), stdout=None, capture_output=False, stderr=subprocess.PIPE,
                  pass_fds=(), preexec_fn=lambda: os.close(1))
    assert proc.returncode == 3
    assert proc.stderr == "error: stdout is closed: nothing can receive the report (redirect it to /dev/null to discard it)\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_stdout_is_exit_3():
    with open("/dev/full", "w") as full:
        proc = _bncli("inspect", str(SAMPLES / "model_defects.pt"), stdout=full, capture_output=False,
                      stderr=subprocess.PIPE)
    assert proc.returncode == 3
    assert proc.stderr == "error: cannot write the report to stdout (No space left on device)\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("args", [["inspect", "missing.pt"],
                                  ["diff", "sample_data/model.pt", "sample_data/model_defects.pt", "--fail-on-change"]])
def test_an_unwritable_stderr_is_exit_3(args):
    with open("/dev/full", "w") as full:
        proc = _bncli(*args, stderr=full, capture_output=False, stdout=subprocess.PIPE)
    assert proc.returncode == 3
    closed = _bncli(*args, capture_output=False, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    assert closed.returncode == 3


def test_nothing_in_bncli_imports_cli():
    for path in (ROOT / "bncli").rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        source = path.read_text()
        assert not re.search(r"^\s*(from bncli\.cli import|import bncli\.cli|from bncli import cli)", source, re.M), path


@pytest.mark.parametrize("fmt", ["table", "json", "markdown", "github"])
def test_skipped_file_names_are_escaped(hostile, fmt):
    (hostile / "notes\n::error::x\x1b[2J.txt").write_text("not a checkpoint")
    result = _invoke(["inspect", str(hostile), "--format", fmt])
    assert result.exit_code == 1
    assert_inert(result.stdout, github=fmt == "github")
    if fmt == "json":
        assert json.loads(result.stdout)["skipped"][0].endswith("notes\n::error::x\x1b[2J.txt")
    else:
        shown = result.stdout.replace("\\::", "::")
        if fmt == "markdown":  # markdown punctuation is backslash-escaped there
            shown = re.sub(r"\\([\\`*\[\]<>!|~&#_])", r"\1", shown)
        assert "notes\\n::error::x\\x1b[2J.txt" in shown


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_hostile_names_are_whole_at_every_width(hostile, columns):
    from test_tables import tables

    result = _invoke(["inspect", str(hostile)], env={"COLUMNS": str(columns)})
    ((headers, rows, _),) = tables(result.stdout.replace("\\::", "::"))
    assert [row[0] for row in rows] == [console.terminal(n) for n in HOSTILE]
