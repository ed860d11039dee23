"""benchmarks/watch_bench.py keeps working: one tiny round prints the table's two rows (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_watch_benchmark_runs():
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, "benchmarks/watch_bench.py", "--rounds", "1", "--steps", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "| bench | what | step | step, watched | overhead | target | note |"
    assert len(lines) == 4 and all(line.startswith("| watch | ") for line in lines[2:])
