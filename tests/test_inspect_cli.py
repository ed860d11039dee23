"""`bncli inspect` end to end: many inputs, exit statuses, selection, thresholds, dtypes, and the CI recipes in docs/ci.md."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections import OrderedDict

import pytest
from conftest import ROOT, SAMPLES, bn_state

DEFECTS = SAMPLES / "model_defects.pt"
CLEAN = SAMPLES / "model.safetensors"


def rules_of(stdout: str, index: int = 0) -> list[str]:
    return [f["rule"] for f in json.loads(stdout)["files"][index]["findings"]]


# --------------------------------------------------------------------------- exit status


@pytest.mark.parametrize(
    "fail_on, code",
    [("error", 1), ("warning", 1), ("info", 1), ("never", 0)],
)
def test_fail_on_levels_on_the_defects(cli, fail_on, code):
    assert cli("inspect", DEFECTS, "--fail-on", fail_on).exit_code == code


def test_fail_on_levels_with_only_a_warning(cli):
    args = ("inspect", DEFECTS, "--select", "BN004")
    assert cli(*args).exit_code == 0  # default: error
    assert cli(*args, "--fail-on", "warning").exit_code == 1
    assert cli(*args, "--fail-on", "info").exit_code == 1


def test_one_unreadable_input_is_reported_and_the_others_audited(cli, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    result = cli("inspect", CLEAN, broken, DEFECTS, "--format", "json", "--fail-on", "never")
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {broken}: truncated: the file ends before its zip directory")
    assert result.stderr.count("\n") == 1
    payload = json.loads(result.stdout)
    assert [f["path"] for f in payload["files"]] == [str(CLEAN), str(broken), str(DEFECTS)]
    assert payload["files"][1]["error"].startswith(f"{broken}: truncated: the file ends before its zip directory")
    assert rules_of(result.stdout, 2) == ["BN003", "BN001", "BN004", "BN015", "BN002", "BN005"]


def test_unreadable_wins_over_findings_and_clean_is_zero(cli):
    assert cli("inspect", DEFECTS, "missing.pt").exit_code == 3
    assert cli("inspect", CLEAN, SAMPLES / "model.pt").exit_code == 0


def test_missing_file_error_line(cli):
    result = cli("inspect", "missing.pt")
    assert (result.exit_code, result.stderr) == (3, "error: missing.pt: no such file\n")


# --------------------------------------------------------------------------- many inputs


def test_directories_are_walked_for_checkpoint_suffixes(cli, tmp_path, make_ckpt):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    shutil.copy(CLEAN, tmp_path / "runs" / "a" / "m.SAFETENSORS")
    shutil.copy(DEFECTS, tmp_path / "runs" / "d.pth")
    shutil.copy(DEFECTS, tmp_path / ".git" / "hidden.pt")
    (tmp_path / "runs" / "notes.txt").write_text("not a checkpoint")
    result = cli("inspect", tmp_path / "runs", "--format", "json")
    assert result.exit_code == 1
    assert [f["path"] for f in json.loads(result.stdout)["files"]] == [
        str(tmp_path / "runs" / "d.pth"),
        str(tmp_path / "runs" / "a" / "m.SAFETENSORS"),
    ]


def test_empty_directory_and_unmatched_glob_are_input_errors(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("inspect", tmp_path / "empty", str(tmp_path / "x*.pt"), CLEAN)
    assert result.exit_code == 3
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'empty'}: no checkpoint file in this directory",
        f"error: {tmp_path / 'x*.pt'}: no file matches this pattern",
    ]


def test_quoted_globs_are_expanded_sorted_and_deduplicated(cli, tmp_path):
    for name in ("b.pt", "a.pt"):
        shutil.copy(DEFECTS, tmp_path / name)
    (tmp_path / "deep").mkdir()
    shutil.copy(CLEAN, tmp_path / "deep" / "c.safetensors")
    result = cli("inspect", str(tmp_path / "*.pt"), tmp_path / "a.pt", str(tmp_path / "**" / "*.safetensors"), "-f", "json")
    assert [f["path"] for f in json.loads(result.stdout)["files"]] == [
        str(tmp_path / "a.pt"),
        str(tmp_path / "b.pt"),
        str(tmp_path / "deep" / "c.safetensors"),
    ]


def test_layer_still_works_and_applies_to_each_file(cli):
    result = cli("inspect", DEFECTS, "--layer", "features.9", "-f", "json")
    assert result.exit_code == 1
    layers = json.loads(result.stdout)["files"][0]["layers"]
    assert [entry["name"] for entry in layers] == ["features.9"] and len(layers[0]["channels"]) == 32
    result = cli("inspect", DEFECTS, SAMPLES / "inputs.safetensors", "--layer", "features.9")
    assert result.exit_code == 3
    assert result.stderr == f"error: {SAMPLES / 'inputs.safetensors'}: no BatchNorm layer found, so no layer 'features.9'\n"
    assert "layer features.9: 32 channels, float32, num_batches_tracked=256" in result.stdout


# --------------------------------------------------------------------------- selection and thresholds


def test_select_and_ignore_on_the_command_line(cli):
    result = cli("inspect", DEFECTS, "-f", "json", "--select", "BN001,collapsed-variance", "--select", "bn005")
    assert rules_of(result.stdout) == ["BN001", "BN004", "BN005"]
    result = cli("inspect", DEFECTS, "-f", "json", "--ignore", "never-updated", "--ignore", "BN001,BN002")
    assert (result.exit_code, rules_of(result.stdout)) == (0, ["BN004", "BN015", "BN005"])


def test_unknown_rule_is_a_usage_error(cli):
    result = cli("inspect", DEFECTS, "--ignore", "BN05")
    assert result.exit_code == 2
    assert result.stderr == "error: unknown rule 'BN05'; did you mean BN015, BN005, BN019?\n"


def test_threshold_options(cli):
    result = cli("inspect", DEFECTS, "-f", "json", "--select", "BN004,BN005,BN008", "--min-var", "1e-9", "--dead-weight", "1e-6",
                 "--max-var", "5")
    assert rules_of(result.stdout) == ["BN008"]
    finding = json.loads(result.stdout)["files"][0]["findings"][0]
    assert finding["layer"] == "features.9" and finding["message"].startswith("running_var above 5 in channel(s)")
    result = cli("inspect", DEFECTS, "-f", "json", "--select", "BN004", "--eps", "1e-3")
    assert "reaches 31.62 (channel 7, eps=0.001)" in json.loads(result.stdout)["files"][0]["findings"][0]["message"]


def test_bad_threshold_is_a_usage_error(cli):
    result = cli("inspect", DEFECTS, "--max-mean", "0")
    assert (result.exit_code, result.stderr) == (2, "error: --max-mean: must be a number > 0; got 0\n")


def test_require_bn(cli):
    tensors = SAMPLES / "inputs.safetensors"
    assert cli("inspect", tensors).exit_code == 0
    result = cli("inspect", tensors, "--require-bn", "-f", "json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["files"][0]["findings"][0]["severity"] == "error"


# --------------------------------------------------------------------------- rules through real files


def test_float16_and_bfloat16_statistics_from_files(cli, make_ckpt, tmp_path):
    import torch
    from safetensors.torch import save_file

    sd = bn_state(4)
    half = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in sd.items())
    half["bn.running_var"][1] = 3e-5  # float16 stores it as a subnormal
    result = cli("inspect", make_ckpt(half), "-f", "json", "--select", "BN009")
    assert result.exit_code == 0
    [finding] = json.loads(result.stdout)["files"][0]["findings"]
    assert finding["channels"] == [1] and "stored as float16" in finding["message"]

    bf = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in sd.items()}
    bf["bn.running_mean"][2] = 1e-39
    save_file(bf, str(tmp_path / "bf.safetensors"))
    result = cli("inspect", tmp_path / "bf.safetensors", "-f", "json", "--select", "BN009")
    [finding] = json.loads(result.stdout)["files"][0]["findings"]
    assert finding["channels"] == [2] and "stored as bfloat16" in finding["message"]


def test_converted_and_untrained_affine_from_a_real_layer(cli, make_ckpt):
    import torch

    bn = torch.nn.BatchNorm2d(3)
    bn.train()
    bn(torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1)
    sd = OrderedDict(("bn." + k, v) for k, v in bn.state_dict().items())
    sd["bn.num_batches_tracked"] = torch.tensor(0)
    result = cli("inspect", make_ckpt(sd), "-f", "json", "--fail-on", "info")
    assert result.exit_code == 1
    assert rules_of(result.stdout) == ["BN007", "BN010"]


# --------------------------------------------------------------------------- pre-commit hook


def read_hooks() -> list[dict[str, object]]:
    """Parse the tiny .pre-commit-hooks.yaml by hand (PyYAML is not a dependency): a list of flat mappings."""
    hooks: list[dict[str, object]] = []
    for raw in (ROOT / ".pre-commit-hooks.yaml").read_text().splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.startswith("- "):
            hooks.append({})
            line = line[2:]
        key, _, value = line.strip().partition(": ")
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            hooks[-1][key] = [v.strip() for v in value[1:-1].split(",")]
        else:
            hooks[-1][key] = value[1:-1] if value[:1] == value[-1:] == "'" else value
    return hooks


def test_pre_commit_hook_definition():
    [hook] = read_hooks()
    assert hook["id"] == "bncli" and hook["entry"] == "bncli inspect" and hook["language"] == "python"
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text()) == [hook]


def test_pre_commit_hook_entry_is_the_console_script():
    from bncli.config import _toml

    tomllib = _toml() or pytest.skip("no TOML reader (Python 3.10 without tomli)")
    [hook] = read_hooks()
    script, *args = shlex.split(str(hook["entry"]))
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][script] == "bncli.cli:main"
    assert args == ["inspect"]


def test_pre_commit_hook_files_pattern_matches_what_bncli_audits():
    from bncli.audit import CHECKPOINT_SUFFIXES

    [hook] = read_hooks()
    pattern = re.compile(str(hook["files"]))
    for suffix in CHECKPOINT_SUFFIXES:
        assert pattern.search(f"models/x{suffix}") and pattern.search(f"X{suffix.upper()}")
    for name in ("input.npy", "notes.txt", "model.pt.json", "README.md"):
        assert not pattern.search(name)


def test_pre_commit_hook_runs_like_pre_commit_would():
    """pre-commit runs `entry args... file...` on the matching files; do the same with this checkout's bncli."""
    [hook] = read_hooks()
    pattern = re.compile(str(hook["files"]))
    staged = sorted(str(p.relative_to(ROOT)) for p in SAMPLES.iterdir() if pattern.search(p.name) and p.name.startswith("model"))
    assert staged == ["sample_data/model.pt", "sample_data/model.safetensors", "sample_data/model_defects.pt",
                      "sample_data/model_defects.safetensors"]
    entry = [sys.executable, "-m", "bncli", *shlex.split(str(hook["entry"]))[1:]]
    clean = subprocess.run([*entry, *staged[:2]], cwd=ROOT, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    bad = subprocess.run([*entry, *staged], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "BN003 never-updated" in bad.stdout


@pytest.mark.skipif(shutil.which("pre-commit") is None, reason="pre-commit is not installed (pip install pre-commit)")
def test_pre_commit_try_repo(tmp_path):  # pragma: no cover - needs pre-commit and a network for the hook's environment
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copy(DEFECTS, repo / "model.pt")
    subprocess.run(["git", "add", "model.pt"], cwd=repo, check=True)
    run = subprocess.run(["pre-commit", "try-repo", str(ROOT), "bncli", "--files", "model.pt"], cwd=repo, capture_output=True,
                         text=True)
    assert run.returncode == 1 and "BN003" in run.stdout


# --------------------------------------------------------------------------- the GitHub Actions example in docs/ci.md


def workflow_commands() -> list[str]:
    text = (ROOT / "docs" / "ci.md").read_text()
    block = text.split("## GitHub Actions", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\s+run: (bncli .*)$", block, re.M)]


def test_github_actions_example_runs(tmp_path):
    commands = workflow_commands()
    assert len(commands) == 2
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(DEFECTS, tmp_path / "checkpoints" / "model.pt")
    summary = tmp_path / "summary.md"
    results = []
    for line in commands:
        words = shlex.split(line)
        redirect = words.index(">>") if ">>" in words else None
        argv = words[:redirect] if redirect is not None else words
        run = subprocess.run([sys.executable, "-m", "bncli", *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        if redirect is not None:
            assert words[redirect + 1] == "$GITHUB_STEP_SUMMARY"
            summary.write_text(run.stdout)
        results.append(run)
    annotate, report = results
    assert annotate.returncode == 1, annotate.stderr
    assert annotate.stdout.splitlines()[0].startswith("::error file=checkpoints/model.pt,title=bncli BN003 never-updated")
    assert report.returncode == 0, report.stderr
    assert summary.read_text().startswith("## bncli inspect: 3 errors, 1 warning, 2 info")


def test_github_actions_example_is_valid_yaml():
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "docs" / "ci.md").read_text()
    block = text.split("## GitHub Actions", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    workflow = yaml.safe_load(block)
    assert [s.get("run", "") for s in workflow["jobs"]["bncli"]["steps"]][-2:] == [f"{c}" for c in workflow_commands()]


def test_inspect_help_imports_no_heavy_module():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom bncli.cli import app\n"
        "assert CliRunner().invoke(app, ['inspect', '--help']).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
