"""Every ```python block of README.md runs, and prints exactly the ```text block that follows it (when one does)."""

from __future__ import annotations

import contextlib
import io
import re
import sys

import pytest
from conftest import ROOT

BLOCK = re.compile(r"```python\n(.*?)```\n(?:\n```text\n(.*?)```)?", re.S)


def _cases():
    for doc in (ROOT / "README.md",):
        for i, (code, expected) in enumerate(BLOCK.findall(doc.read_text())):
            yield pytest.param(code, expected, id=f"{doc.name}#{i}")


def test_there_are_python_examples():
    assert len(list(_cases())) >= 2


@pytest.mark.parametrize(("code", "expected"), list(_cases()))
def test_python_example(code, expected, tmp_path, monkeypatch):
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # `from sample_data.smallcnn import ...`, as from the repository root
    for name in [m for m in sys.modules if m == "sample_data" or m.startswith("sample_data.")]:
        monkeypatch.delitem(sys.modules, name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    if expected:
        assert out.getvalue() == expected
