"""The benchmark keeps working: a quick run in a subprocess produces the table with every target's rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs(tmp_path):
    raw = tmp_path / "rows.json"
    argv = ["--quick", "--repeat", "1", "--workdir", str(tmp_path / "inputs"), "--json", str(raw)]
    result = subprocess.run(
        [sys.executable, "benchmarks/bench.py", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout
    assert table.startswith("bncli benchmark (quick, 1 rounds, medians)")
    assert "| # | what | median ms | peak RSS MB | ratio | target | note |" in table
    rows = json.loads(raw.read_text())
    assert {row["target"] for row in rows} == {1, 2, 3, 4, 5, 6, 7}
    notes = {row["what"].split(" (")[0]: row["note"] for row in rows}
    assert notes["bncli --help"] == "imports no torch/numpy/safetensors"
    assert notes["bncli inspect tiny.safetensors --format json"] == "imports no pydantic, no torch"
    assert notes["bncli inspect big.safetensors"] == "torch imported: False"
    assert notes["bncli inspect big.pt"].startswith("torch imported: False; storage bytes read: 0.")
    normalize = [row for row in rows if row["what"].startswith("bncli normalize compute")]
    assert len(normalize) == 2 and all("max |y - BatchNorm2d|" in row["note"] for row in normalize)


def test_quick_recalibrate_benchmark_runs_and_is_accurate():
    """benchmarks/recalibrate_bench.py keeps working; its accuracy line (bncli against float64, with and without a
    mean offset of 1e4) stays within the 1e-6 bncli promises. Its timings are figures, not assertions."""
    import re

    result = subprocess.run([sys.executable, "benchmarks/recalibrate_bench.py", "--quick", "--repeat", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[2].startswith("| torch.optim.swa_utils.update_bn script |")
    assert lines[3].startswith("| bncli recalibrate |")
    errors = [float(v) for v in re.findall(r"\d\.\de[-+]\d\d", lines[4])]
    assert len(errors) == 4 and max(errors) < 1e-6, lines[4]
