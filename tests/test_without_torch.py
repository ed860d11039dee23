"""`pip install bncli` without torch: inspect, diff and rules work and never import it; normalize and
recalibrate say in one line which extra to install (exit 3).

Each case runs in a subprocess whose sitecustomize puts a finder first on sys.meta_path that refuses torch, so
`import torch` fails there as it would where torch is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLES

BLOCKER = '''
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch' (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoTorch())
'''

RUN = '''
import sys
from bncli.cli import main
sys.argv = ["bncli", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.stderr.write(f"\\nexit={code} torch_loaded={'torch' in sys.modules}\\n")
'''


@pytest.fixture
def without_torch(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "NO_COLOR": "1", "COLUMNS": "200"}

    def bncli(*args) -> tuple[str, str, int, bool]:
        proc = subprocess.run([sys.executable, "-c", RUN, *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        err, _, tail = proc.stderr.rpartition("\nexit=")
        code, loaded = tail.split()
        return proc.stdout, err, int(code), loaded == "torch_loaded=True"

    return bncli


def test_the_blocker_really_blocks(without_torch, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    proc = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "blocked by the test" in proc.stderr


@pytest.mark.parametrize("sample", ["model.safetensors", "model_defects.safetensors"])
def test_inspect_safetensors_without_torch(without_torch, sample):
    out, err, code, loaded = without_torch("inspect", SAMPLES / sample, "--format", "json")
    assert code in (0, 1) and not loaded, err
    assert '"schema_version": 1' in out


def test_diff_and_rules_without_torch(without_torch):
    out, err, code, loaded = without_torch("diff", SAMPLES / "model.safetensors", SAMPLES / "model_defects.safetensors")
    assert code == 0 and not loaded, err
    out, err, code, loaded = without_torch("rules", "BN004")
    assert code == 0 and not loaded and out.startswith("BN004 collapsed-variance")


def test_inspect_torch_zip_without_torch(without_torch):
    """The torch-free readers in bncli/formats/ (the lead's pickled-models work) make this true for .pt files;
    the legacy (pre-1.6) format and whole pickled models are covered by their own tests there."""
    out, err, code, loaded = without_torch("inspect", SAMPLES / "model_defects.pt", "--format", "json")
    assert code == 1 and not loaded, err
    out, err, code, loaded = without_torch("diff", SAMPLES / "model.pt", SAMPLES / "model_defects.pt")
    assert code == 0 and not loaded, err


@pytest.mark.parametrize(
    "args",
    [
        ("normalize", SAMPLES / "input.pt"),
        ("recalibrate", SAMPLES / "model.pt", "--model", "smallcnn:SmallCNN", "--data", SAMPLES / "input.pt", "-o", "out.pt"),
    ],
)
def test_normalize_and_recalibrate_name_the_extra(without_torch, args):
    out, err, code, loaded = without_torch(*args)
    assert code == 3 and out == ""
    assert err == (
        f"error: `bncli {args[0]}` needs PyTorch, which is not installed here: pip install 'bncli[torch]' "
        "(inspect, diff and rules work without it)\n"
    )
