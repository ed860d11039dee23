"""Renderers: every format is covered, sparklines, GitHub escaping, markdown tables, and the JSON schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLES
from schema_lite import validate

from bncli.audit import expand_inputs, inspect_files
from bncli.render import Format, UnsupportedFormat, renderer_for
from bncli.render.github import command, escape_data, escape_property, inspect_github
from bncli.render.json import inspect_json
from bncli.render.markdown import cell, inspect_markdown
from bncli.render.spark import INVALID, ZERO, var_spark, weight_spark
from bncli.report import FileReport, Finding, InspectReport, Severity

SCHEMA = json.loads((ROOT / "docs" / "schema" / "inspect.json").read_text())


@pytest.fixture(scope="module")
def report() -> InspectReport:
    """The defects sample, a clean file, a file without BatchNorm and a missing one."""
    inputs = expand_inputs([SAMPLES / "model_defects.pt", SAMPLES / "model.safetensors", SAMPLES / "inputs.safetensors",
                            "missing.pt", "nothing-*.pt"])
    return inspect_files(inputs)


def test_every_format_has_an_inspect_renderer():
    for fmt in Format:
        assert callable(renderer_for(fmt, "inspect")), fmt


def test_a_format_a_command_lacks_is_a_usage_error(cli):
    with pytest.raises(UnsupportedFormat) as info:
        renderer_for(Format.GITHUB, "normalize")
    assert info.value.message == "--format github is not available for `bncli normalize`; use one of: table, json"
    result = cli("normalize", SAMPLES / "input.pt", "--format", "markdown")
    assert result.exit_code == 2
    assert result.stderr == "error: --format markdown is not available for `bncli normalize`; use one of: table, json\n"


def test_render_imports_neither_torch_nor_numpy():
    code = (
        "import sys, bncli.render.table, bncli.render.json, bncli.render.markdown, bncli.render.github, bncli.render.spark;"
        "print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- sparklines


def test_sparkline_one_block_per_channel_low_to_high():
    assert weight_spark([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == "▁▂▃▄▅▆▇█"
    assert var_spark([1e-3, 1e-2, 1e-1, 1.0]) == "▁▃▆█"  # log10: -3, -2, -1, 0 -> levels 0, 2.33, 4.67, 7
    assert weight_spark(None) == ""
    assert var_spark([]) == ""


def test_sparkline_marks_values_log10_cannot_take():
    assert var_spark([1.0, float("nan"), 0.0, -1.0, float("inf"), 10.0]) == f"▁{INVALID}{ZERO}{INVALID * 2}█"
    assert var_spark([0.0, 0.0, 1.0]) == f"{ZERO}{ZERO}▄"  # a pruned layer is not a corrupt one
    assert var_spark([float("nan")] * 3) == INVALID * 3


def test_sparkline_of_equal_values_is_flat():
    assert var_spark([1.0] * 5) == "▄▄▄▄▄"


def test_sparkline_buckets_keep_the_outlier():
    values = [1.0] * 1000
    values[637] = 1e-6  # one collapsed channel among 1000 must still show
    line = var_spark(values, width=16)
    assert len(line) == 16
    assert line == "█" * 10 + "▁" + "█" * 5  # channel 637 falls in bucket 637 * 16 // 1000 = 10
    values[3] = float("nan")
    assert var_spark(values, width=16)[0] == INVALID


# --------------------------------------------------------------------------- github


def test_github_escaping_follows_the_actions_toolkit():
    assert escape_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"
    assert command("error", "x: 1, y", file="runs/a,b:c.pt", title="t") == "::error file=runs/a%2Cb%3Ac.pt,title=t::x: 1, y"


def test_github_annotations(report):
    lines = inspect_github(report).splitlines()
    defects = str(SAMPLES / "model_defects.pt")
    assert lines[0] == (
        f"::error file={defects},title=bncli BN003 never-updated in features.1::features.1: every running_mean is 0 "
        "and every running_var is 1: the statistics were never updated (trained in eval mode, frozen, or saved before any "
        "forward pass)"
    )
    assert lines[3].startswith(f"::notice file={defects},title=bncli BN015 fold-risk in features.5::features.5: the folded")
    assert lines[5] == (
        f"::notice file={defects},title=bncli BN005 dead-channel in features.9::features.9: |weight| below 0.001 in 3 "
        "channel(s) (0, 2, 5): they output a constant"
    )
    assert [line.split(" ", 1)[0] for line in lines[:-1]] == ["::error", "::error", "::warning", "::notice", "::error",
                                                              "::notice", "::notice", "::error", "::error"]
    assert lines[6].startswith(f"::notice file={SAMPLES / 'inputs.safetensors'},title=bncli BN011 no-batchnorm::no BatchNorm")
    assert lines[7] == "::error file=missing.pt,title=bncli unreadable checkpoint::missing.pt: no such file"
    assert lines[8] == "::error file=nothing-*.pt,title=bncli unreadable checkpoint::nothing-*.pt: no file matches this pattern"
    assert lines[-1] == "5 files (2 unreadable), 6 BatchNorm layers, 160 channels; findings: 3 errors, 1 warning, 3 info"


def test_github_multiline_message_stays_one_command():
    rep = InspectReport((FileReport("a.pt", "torch-zip", None, None, (),
                                    (Finding("BN001", "non-finite", Severity.ERROR, "x", (), "line1\nline2 100%"),)),))
    # a newline in a message quotes a name from the file: shown as a visible escape, the command stays one line
    assert inspect_github(rep).splitlines()[0] == "::error file=a.pt,title=bncli BN001 non-finite in x::x: line1\\nline2 100%25"


# --------------------------------------------------------------------------- markdown


def test_markdown_cell_escapes_pipes_and_newlines():
    assert cell("|w| a\nb") == "\\|w\\| a\\nb"


def test_markdown_report(report):
    text = inspect_markdown(report)
    lines = text.splitlines()
    assert lines[0] == "## bncli inspect: 3 errors, 1 warning, 3 info"
    assert f"### `{SAMPLES / 'model_defects.pt'}`" in lines
    assert "| `features.1` | 16 | 0 | 1 | 1 | 1 | 0.9591 | `▄▄▄▄▄▄▄▄▄▄▄▄▄▄▄▄` | `▆▃▃█▂▄▂▅▃▆▅▁▄▁▅▄` | never-updated |" in lines
    assert ("| ℹ️ info | BN005 dead-channel | `features.9` | \\|weight\\| below 0.001 in 3 channel(s) (0, 2, 5): "
            "they output a constant |") in lines
    assert "| ℹ️ info | BN011 no-batchnorm | (file) | no BatchNorm layer in the file (no key prefix has both running_mean "\
           "and running_var) |" in lines
    assert "**unreadable:** missing.pt: no such file" in lines
    # Every table row has as many cells as its header.
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            width = lines[i - 1].replace("\\|", "").count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].replace("\\|", "").count("|") == width, lines[j]
                j += 1


def test_markdown_channel_table_with_layer():
    rep = inspect_files([SAMPLES / "model_defects.pt"], layer="features.9")
    lines = inspect_markdown(rep).splitlines()
    assert "Layer `features.9`, channel by channel:" in lines
    assert any(line.startswith("| 4 | ") and "| -0.5 |" in line and "negative-variance" in line for line in lines)


# --------------------------------------------------------------------------- json


def test_json_matches_the_committed_schema(report):
    payload = json.loads(inspect_json(report))
    assert validate(payload, SCHEMA, closed=True) == []
    files = {f["path"]: f for f in payload["files"]}
    assert files["missing.pt"] == {"path": "missing.pt", "format": None, "container": None, "prefix": None, "alternatives": [], "model_class": None, "layers": [],
                                   "findings": [], "error": "missing.pt: no such file"}
    assert files[str(SAMPLES / "model_defects.pt")]["error"] is None
    assert payload["summary"] == {"files": 5, "layers": 6, "channels": 160, "findings": {"info": 3, "warning": 1, "error": 3},
                                  "unreadable": 2, "skipped": 0}


def test_json_with_channels_matches_the_schema():
    payload = json.loads(inspect_json(inspect_files([SAMPLES / "model_defects.pt"], layer="features.5")))
    assert validate(payload, SCHEMA, closed=True) == []
    channel = payload["files"][0]["layers"][0]["channels"][3]
    assert channel["running_var"] is None  # NaN -> null, and said beside it
    assert channel["non_finite"] == {"running_var": "nan", "running_std": "nan"}
    assert all("non_finite" not in c for i, c in enumerate(payload["files"][0]["layers"][0]["channels"]) if i != 3)


def test_json_tells_inf_from_nan_in_inspect(make_ckpt):
    import torch
    from conftest import bn_state

    sd = bn_state(4, "bn")
    sd["bn.running_var"][1] = float("inf")
    sd["bn.running_mean"][2] = float("-inf")
    sd["bn.running_var"][3] = float("nan")
    payload = json.loads(inspect_json(inspect_files([make_ckpt(sd, "m.pt")], layer="bn")))
    assert validate(payload, SCHEMA, closed=True) == []
    channels = payload["files"][0]["layers"][0]["channels"]
    assert channels[1]["running_var"] is None and channels[1]["non_finite"] == {"running_var": "inf", "running_std": "inf"}
    assert channels[2]["running_mean"] is None and channels[2]["non_finite"] == {"running_mean": "-inf"}
    assert channels[3]["non_finite"] == {"running_var": "nan", "running_std": "nan"}
    assert "non_finite" not in channels[0]
    assert torch.isinf(sd["bn.running_var"][1])  # the reference: what the file holds


def test_non_finite_is_said_in_one_place_for_every_shape():
    from bncli.render.json import _dump

    out = json.loads(_dump({"a": 1.5, "b": float("inf"), "c": [1.0, float("-inf"), float("nan")], "d": {"e": float("nan")},
                            "f": [{"g": float("-inf")}], "h": None}))
    assert out == {"a": 1.5, "b": None, "c": [1.0, None, None], "d": {"e": None, "non_finite": {"e": "nan"}},
                   "f": [{"g": None, "non_finite": {"g": "-inf"}}], "h": None,
                   "non_finite": {"b": "inf", "c": [None, "-inf", "nan"]}}
    assert json.loads(_dump({"x": 2.0})) == {"x": 2.0}  # nothing added when every number is finite


def test_schema_lite_catches_violations():
    bad = {"schema_version": 2, "files": [{"path": 3}], "summary": {}}
    errors = validate(bad, SCHEMA)
    assert "$.schema_version: 2 != 1" in errors
    assert "$.files[0].path: 3 is not of type ['string']" in errors
    assert "$.files[0]: missing required key 'layers'" in errors


def test_schema_with_jsonschema_when_installed(report):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(json.loads(inspect_json(report)), SCHEMA, cls=jsonschema.Draft202012Validator)


def test_foundation_keys_are_kept(report):
    payload = json.loads(inspect_json(report))
    assert {"schema_version", "files"} <= set(payload)
    entry = payload["files"][0]
    assert {"path", "layers", "findings"} <= set(entry)
    assert {"name", "num_features", "num_batches_tracked"} <= set(entry["layers"][0])
    assert set(entry["findings"][0]) >= {"rule", "severity", "layer", "channels", "message"}


# --------------------------------------------------------------------------- table


def test_table_shows_sparklines_findings_and_unreadable(cli):
    result = cli("inspect", SAMPLES / "model_defects.pt", "missing.pt")
    assert result.exit_code == 3
    out = result.stdout
    assert "log10 var" in out and "█×█▁█▁██████████" in out  # features.5: NaN in channel 3, collapsed 7 and 11
    assert "▁▁▁▇▇██▇█▇███▇▇▇" in out  # features.9 |weight|: dead channels 0, 2, 5
    assert "missing.pt" not in out  # an unreadable input is said once, on stderr, and counted in the summary
    assert result.stderr == "error: missing.pt: no such file\n"
    last = "2 files (1 unreadable), 3 BatchNorm layers, 80 channels; findings: 3 errors, 1 warning, 2 info"
    assert out.rstrip().splitlines()[-1] == last


def test_table_of_a_file_without_batchnorm(cli):
    result = cli("inspect", SAMPLES / "inputs.safetensors")
    assert result.exit_code == 0
    assert "info    BN011 no-batchnorm no BatchNorm layer in the file" in result.stdout


def test_sparkline_width_never_exceeds_16(tmp_path, make_ckpt):
    from conftest import bn_state

    path = make_ckpt(bn_state(channels=300))
    rep = inspect_files([path])
    layer = rep.files[0].layers[0]
    assert len(var_spark(layer.running_var_profile)) == 16
    assert layer.weight_abs_profile is not None and len(layer.weight_abs_profile) == 16  # a report stays small


def test_per_channel_values_are_exact(make_ckpt):
    import torch
    from conftest import bn_state

    sd = bn_state(channels=5)
    rep = inspect_files([make_ckpt(sd)])
    lr = rep.files[0].layers[0]
    assert lr.running_var_profile == tuple(float(v) for v in sd["bn.running_var"].double())
    assert lr.weight_abs_profile == tuple(float(v) for v in torch.abs(sd["bn.weight"].double()))
    assert Path(rep.files[0].path).exists()


def test_profile_keeps_each_buckets_outlier_and_invalid_channels():
    import numpy as np

    from bncli.audit import channel_profile

    var = np.ones(64, dtype=np.float32)
    var[5] = 1e-8  # an outlier in bucket 1 (channels 4-7)
    var[40] = np.nan  # an invalid channel in bucket 10
    var[41] = 1e-3  # another outlier in the same bucket: the invalid one wins
    profile = channel_profile(var, log_scale=True)
    assert len(profile) == 16
    assert profile[1] == pytest.approx(1e-8) and np.isnan(profile[10])
    assert all(p == 1.0 for i, p in enumerate(profile) if i not in (1, 10))
    # the sparkline of the profile shows what the sparkline of every channel shows
    var[41] = 1.0
    assert var_spark(channel_profile(var, log_scale=True)) == var_spark([float(v) for v in var])


def test_profile_shows_an_invalid_channel_before_an_exact_zero():
    import numpy as np

    from bncli.audit import channel_profile

    var = np.ones(64, dtype=np.float32)
    var[8], var[10] = 0.0, np.nan  # one bucket (channels 8-11): the NaN wins
    var[20] = 0.0  # another: the zero
    profile = channel_profile(var, log_scale=True)
    assert np.isnan(profile[2]) and profile[5] == 0.0
    assert var_spark(profile)[2] == INVALID and var_spark(profile)[5] == ZERO


def test_collapsed_variance_counts_the_exact_zeros():
    import numpy as np

    from bncli.layers import BNLayer
    from bncli.rules import Thresholds, check_collapsed_var

    var = np.ones(12, dtype=np.float32)
    var[[1, 2, 3]] = 0.0
    var[7] = 1e-8
    layer = BNLayer(name="bn", running_mean=np.zeros(12, dtype=np.float32), running_var=var, weight=None, bias=None,
                    num_batches_tracked=10, dtype="float32")
    ((channels, message),) = check_collapsed_var(layer, Thresholds())
    assert channels == (1, 2, 3, 7)
    assert message.startswith("running_var below 1e-05 in channel(s) 1, 2, 3, 7, 3 of the 4 exactly 0: ")
