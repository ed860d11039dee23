"""Every `console` example in README.md and docs/*.md is run, and its output must match what is written.

To refresh the examples after a deliberate change of output: BNCLI_UPDATE_DOCS=1 python3 -m pytest tests/test_docs.py
"""

from __future__ import annotations

import os
import re
import shlex

import pytest
from conftest import ROOT
from typer.testing import CliRunner

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```console\n(.*?)```", re.S)
WIDTH = "160"  # the examples are rendered at the width bncli uses when piped


def _examples(text: str) -> list[tuple[str, str]]:
    """(command, expected output) pairs from every ```console block."""
    pairs = []
    for block in BLOCK.findall(text):
        command, lines = None, []
        for line in block.splitlines():
            if line.startswith("$ "):
                if command is not None:
                    pairs.append((command, "\n".join(lines)))
                command, lines = line[2:], []
            else:
                lines.append(line)
        if command is not None:
            pairs.append((command, "\n".join(lines)))
    return pairs


def _run(command: str) -> str:
    from bncli.cli import app

    argv = shlex.split(command)
    assert argv[0] == "bncli", f"doc examples run bncli only: {command}"
    result = CliRunner(env={"NO_COLOR": "1", "COLUMNS": WIDTH, "TERM": "dumb"}).invoke(app, argv[1:])
    text = result.stdout + result.stderr
    return "\n".join(line.rstrip() for line in text.rstrip("\n").splitlines())


def _cases():
    for doc in DOCS:
        for command, expected in _examples(doc.read_text()):
            yield pytest.param(doc, command, expected, id=f"{doc.name}: {command}")


@pytest.mark.parametrize(("doc", "command", "expected"), list(_cases()))
def test_doc_example(doc, command, expected, monkeypatch, tmp_path):
    # Run where sample_data/ is reachable but nothing the example writes can land in the repository.
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    monkeypatch.chdir(tmp_path)
    actual = _run(command)
    if os.environ.get("BNCLI_UPDATE_DOCS"):
        text = doc.read_text()
        old = f"$ {command}\n{expected}\n" if expected else f"$ {command}\n"
        assert old in text
        doc.write_text(text.replace(old, f"$ {command}\n{actual}\n", 1))
        return
    assert actual == "\n".join(line.rstrip() for line in expected.splitlines())


def test_docs_have_examples():
    assert len(list(_cases())) >= 5
