"""Every table at every width: no cell is ever cut or folded; whole columns go, in a fixed order, with one line saying so.

The tables are parsed back from the CLI's own output and compared cell by cell with what the report holds.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
from conftest import ROOT, SAMPLES, bn_state
from typer.testing import CliRunner

WIDTHS = (60, 80, 100, 120, 200)
LONG_NAMES = ("initial_block.batch_norm", "encoder.stage4.bottleneck_12.downsample_projection.batch_norm",
              "decoder.upsample_4_0.main_branch.ext_conv2.1", "bn")


def run(*args, columns: int | None = 80) -> str:
    from bncli.cli import app

    env = {"NO_COLOR": "1", "TERM": "dumb"}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    result = CliRunner(env=env).invoke(app, [str(a) for a in args])
    assert result.exit_code in (0, 1), result.output
    return result.stdout


def tables(output: str) -> list[tuple[list[str], list[list[str]], list[str]]]:
    """Every table in `output` as (headers, logical rows, the lines after it): wrapped cells joined again."""
    lines = output.splitlines()
    found = []
    for at, line in enumerate(lines):
        if "╇" not in line and not (line.startswith("━") and set(line) <= {"━"}):
            continue
        top = at
        while top > 0 and "┃" in lines[top - 1]:
            top -= 1
        head = [[c.strip() for c in h.split("┃")] for h in lines[top:at]]
        n = max(len(h) for h in head)
        head = [h + [""] * (n - len(h)) for h in head]
        headers = ["\n".join(h[i] for h in head if h[i]) for i in range(len(head[0]))]
        rows: list[list[list[str]]] = []
        end = at + 1
        while end < len(lines) and "│" in lines[end]:
            cells = [c.strip() for c in lines[end].split("│")]
            assert len(cells) == len(headers), lines[end]
            # a row's first line has every unwrapping cell (numbers); a continuation only the wrapped ones
            numbers = [c for h, c in zip(headers, cells, strict=True) if h not in ("layer", "flags")]
            if not rows or any(numbers):
                rows.append([[c] if c else [] for c in cells])
            else:
                for part, c in zip(rows[-1], cells, strict=True):
                    if c:
                        part.append(c)
            end += 1
        joined = [[("" if h == "layer" else " ").join(p) for h, p in zip(headers, row, strict=True)] for row in rows]
        found.append((headers, joined, lines[end:end + 4]))
    return found


def expected_layer_rows(path, **kwargs) -> dict[str, dict[str, str]]:
    """header -> cell for every layer, straight from the report (the renderer's own formatting of each number)."""
    from bncli.audit import inspect_files
    from bncli.render.common import fmt
    from bncli.render.spark import var_spark, weight_spark

    (file,) = inspect_files([path], **kwargs).files
    rows = {}
    for layer in file.layers:
        m, v = layer.running_mean, layer.running_var
        rows[layer.name] = {
            "layer": layer.name, "C": str(layer.num_features), "batches": fmt(layer.num_batches_tracked),
            "mean\nmin": fmt(m.min), "mean\nmean": fmt(m.center), "mean\nmax": fmt(m.max), "var\nmin": fmt(v.min),
            "var\nmedian": fmt(v.center), "var\nmax": fmt(v.max), "min\n|weight|": fmt(layer.weight_abs_min),
            "log10 var\nper channel": var_spark(layer.running_var_profile),
            "|weight|\nper channel": weight_spark(layer.weight_abs_profile), "flags": ", ".join(layer.flags),
        }  # fmt: skip
    return rows


@pytest.fixture
def long_names(make_ckpt):
    sd = OrderedDict()
    for i, name in enumerate(LONG_NAMES):
        layer = bn_state(8, prefix=name, seed=i)
        if i == 1:
            layer[f"{name}.weight"][:3] = 0.0  # dead channels: a flag to wrap
            layer[f"{name}.running_var"][4] = -1.0
        sd.update(layer)
    return make_ckpt(sd, "long.pt")


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("which", ["defects", "long"])
def test_inspect_cells_are_never_cut(width, which, long_names):
    path = SAMPLES / "model_defects.pt" if which == "defects" else long_names
    out = run("inspect", path, columns=width)
    ((headers, rows, after),) = tables(out)
    expected = expected_layer_rows(path)
    assert [r[0] for r in rows] == list(expected)  # every layer, its name whole (joined again at its dots)
    for row in rows:
        want = expected[row[0]]
        assert dict(zip(headers, row, strict=True)) == {h: want[h] for h in headers}
    table_lines = [line for line in out.splitlines() if "│" in line or "┃" in line or "╇" in line]
    assert max(len(line) for line in table_lines) <= width
    assert {"layer", "C", "var\nmin", "flags"} <= set(headers)  # never dropped
    left = [h for h in expected[rows[0][0]] if h not in headers]
    if left:  # one dim line names what is not shown
        assert after[0].startswith(f"not shown at {width} columns: ")
        said = " ".join(" ".join(after).split())
        assert all(" ".join(h.split()) in said for h in left)
    else:
        assert not any("not shown" in line for line in after)


def test_names_wrap_only_at_dots_and_only_when_needed(long_names):
    out = run("inspect", long_names, columns=60)
    name_lines = [line.split(" │ ")[0].strip() for line in out.splitlines() if " │ " in line]
    assert "encoder.stage4." in name_lines and "downsample_projection." in name_lines  # broken after dots
    assert "initial_block.batch_norm" in name_lines  # a name that fits stays whole
    # a line of a name ends after a dot, or is where the name ends (its last dot-separated parts)
    assert all(part.endswith(".") or any(n.endswith("." + part) or n == part for n in LONG_NAMES) or not part
               for part in name_lines)
    wide = run("inspect", long_names, columns=200)
    assert LONG_NAMES[1] + " │" in wide  # at 200 nothing wraps


def test_columns_go_in_a_fixed_order():
    seen = []
    for width in (200, 160, 140, 120, 100, 80, 60):
        ((headers, _, _),) = tables(run("inspect", SAMPLES / "model_defects.pt", columns=width))
        seen.append(headers)
    for wider, narrower in zip(seen, seen[1:], strict=False):
        assert set(narrower) <= set(wider)  # a narrower console only ever loses columns
        assert [h for h in wider if h in narrower] == narrower  # and keeps the order of the rest


def test_wide_and_piped_output_keep_every_column():
    full = tables(run("inspect", SAMPLES / "model_defects.pt", columns=200))[0][0]
    assert tables(run("inspect", SAMPLES / "model_defects.pt", "--wide", columns=60))[0][0] == full
    assert tables(run("inspect", SAMPLES / "model_defects.pt", columns=None))[0][0] == full  # piped: 160 columns
    assert "not shown" not in run("inspect", SAMPLES / "model_defects.pt", "--wide", columns=60)


@pytest.mark.parametrize("width", WIDTHS)
def test_layer_channel_table_cells_are_never_cut(width):
    from bncli.audit import inspect_files
    from bncli.render.common import fmt

    out = run("inspect", SAMPLES / "model_defects.pt", "--layer", "features.9", columns=width)
    ((headers, rows, _),) = tables(out)
    (layer,) = inspect_files([SAMPLES / "model_defects.pt"], layer="features.9").files[0].layers
    for row, ch in zip(rows, layer.channels, strict=True):
        want = {"ch": str(ch.index), "running_mean": fmt(ch.running_mean), "running_var": fmt(ch.running_var),
                "running std": fmt(ch.running_std), "weight": fmt(ch.weight), "bias": fmt(ch.bias),
                "flags": ", ".join(ch.flags)}
        assert dict(zip(headers, row, strict=True)) == {h: want[h] for h in headers}


@pytest.mark.parametrize("width", WIDTHS)
def test_diff_cells_are_never_cut(width, long_names, make_ckpt):
    import torch

    from bncli.diff import diff_files
    from bncli.render.diff import LAYER_HEADERS, layer_cells

    b = make_ckpt(OrderedDict((k, v * 2 if k.endswith("running_var") else v)
                              for k, v in torch.load(long_names, weights_only=True).items()), "b.pt")
    for a, bb in ((SAMPLES / "model.pt", SAMPLES / "model_defects.pt"), (long_names, b)):
        out = run("diff", a, bb, columns=width)
        ((headers, rows, _),) = tables(out)
        report = diff_files(a, bb)
        assert len(rows) == len(report.layers)
        for row, layer in zip(rows, report.layers, strict=True):
            want = dict(zip(LAYER_HEADERS, layer_cells(layer), strict=True))
            assert dict(zip(headers, row, strict=True)) == {h: want[h] for h in headers}
        assert {"layer", "C", "verdict"} <= set(headers)


@pytest.mark.parametrize("width", WIDTHS)
def test_normalize_cells_are_never_cut(width):
    from bncli.normalize import normalize
    from bncli.render.common import fmt

    out = run("normalize", SAMPLES / "input.pt", columns=width)
    ((headers, rows, _),) = tables(out)
    report = normalize(SAMPLES / "input.pt")
    for row, c in zip(rows, report.channels, strict=True):
        want = dict(zip(("ch", "in mean", "in std", "out mean", "out std", "running_mean", "running_var"),
                        (str(c.index), *(fmt(x) for x in (c.input_mean, c.input_std, c.output_mean, c.output_std,
                                                          c.running_mean, c.running_var))), strict=True))
        assert dict(zip(headers, row, strict=True)) == {h: want[h] for h in headers}


GOLDEN_INSPECT_80 = """\
sample_data/model_defects.pt (torch-zip)
           ┃    ┃   var ┃    var ┃ log10 var        ┃
layer      ┃  C ┃   min ┃    max ┃ per channel      ┃ flags
━━━━━━━━━━━╇━━━━╇━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━━
features.1 │ 16 │     1 │      1 │ ▄▄▄▄▄▄▄▄▄▄▄▄▄▄▄▄ │ never-updated
features.5 │ 32 │ 1e-08 │ 0.8924 │ █×█▁█▁██████████ │ non-finite,
           │    │       │        │                  │ collapsed-variance,
           │    │       │        │                  │ fold-risk
features.9 │ 32 │  -0.5 │  8.193 │ ▇▇×▂▆▇▄▄█▁▃▅█▃▇▄ │ negative-variance,
           │    │       │        │                  │ dead-channel
not shown at 80 columns: batches, mean min, mean mean, mean max, var median, min
|weight|, |weight| per channel (--wide or --format json shows them)
error   BN003 never-updated features.1: every running_mean is 0 and every
running_var is 1: the statistics were never updated (trained in eval mode,
frozen, or saved before any forward pass)
error   BN001 non-finite features.5: running_var is NaN in channel(s) 3
warning BN004 collapsed-variance features.5: running_var below 1e-05 in
channel(s) 7, 11: the normalization scale 1/sqrt(running_var + eps) reaches
316.1 (channel 7, eps=1e-05)
info    BN015 fold-risk features.5: the folded scale |weight|/sqrt(running_var +
eps) reaches 313.2 in channel 11, 224.8x the median 1.393 (eps=1e-05); above
100x the median in channel(s) 7, 11: per-tensor int8 quantization after folding
loses the small channels
error   BN002 negative-variance features.9: running_var is negative in
channel(s) 4, which no variance can be: the statistics are corrupt
info    BN005 dead-channel features.9: |weight| below 0.001 in 3 channel(s) (0,
2, 5): they output a constant
3 BatchNorm layers, 80 channels; findings: 3 errors, 1 warning, 2 info
"""

GOLDEN_DIFF_80 = """\
A = sample_data/model.pt   B = sample_data/model_defects.pt   (eps=1e-05)
           ┃    ┃         ┃ max mean ┃ var ratio ┃ var ratio ┃   mean ┃       Δ
layer      ┃  C ┃ verdict ┃    shift ┃       min ┃       max ┃ sym KL ┃ batches
━━━━━━━━━━━╇━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━
features.1 │ 16 │ changed │    1.899 │    0.2607 │     1.304 │  2.259 │    -256
features.5 │ 32 │ changed │        0 │       nan │       nan │    nan │      +0
features.9 │ 32 │ changed │        0 │       nan │       nan │    nan │      +0
not shown at 80 columns: max |Δweight|, max |Δbias| (--wide or --format json
shows them)
num_batches_tracked changed unevenly: features.1 -256; the other 2 layers +0
3 layers in both: 3 changed, 0 shape-changed, 0 identical; 0 only in A, 0 only
in B
mean shift = |mean_B - mean_A| / sqrt(var_A + eps); var ratio = var_B / var_A;
sym KL = KL(A||B) + KL(B||A) of N(mean, var + eps)
"""


def _golden(args) -> str:
    return "\n".join(line.rstrip() for line in run(*args, columns=80).splitlines())


def test_golden_inspect_at_80_columns(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert _golden(["inspect", "sample_data/model_defects.pt"]) == GOLDEN_INSPECT_80.rstrip("\n")


def test_golden_diff_at_80_columns(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert _golden(["diff", "sample_data/model.pt", "sample_data/model_defects.pt"]) == GOLDEN_DIFF_80.rstrip("\n")


def test_the_same_finding_in_many_layers_is_one_line_in_the_table(make_ckpt):
    import torch

    sd = OrderedDict()
    for name in ("a.bn", "b.bn", "c.bn"):
        layer = bn_state(4, prefix=name)
        layer[f"{name}.running_mean"] = torch.zeros(4)
        layer[f"{name}.running_var"] = torch.ones(4)  # never updated: the same message in each layer
        sd.update(layer)
    path = make_ckpt(sd)
    out = run("inspect", path, "--select", "BN003", columns=200)
    lines = [line for line in out.splitlines() if "BN003" in line]
    assert lines == ["error   BN003 never-updated a.bn, b.bn, c.bn: every running_mean is 0 and every running_var is 1: "
                     "the statistics were never updated (trained in eval mode, frozen, or saved before any forward pass)"]
    import json

    findings = json.loads(run("inspect", path, "--select", "BN003", "--format", "json"))["files"][0]["findings"]
    assert [f["layer"] for f in findings] == ["a.bn", "b.bn", "c.bn"]  # JSON keeps one finding per layer


def test_flags_and_findings_are_styled_by_severity():
    import io

    from rich.console import Console

    from bncli.audit import inspect_files
    from bncli.render.table import inspect_table

    console = Console(file=io.StringIO(), width=250, color_system="standard", force_terminal=True)
    console.print(inspect_table(inspect_files([SAMPLES / "model_defects.pt"], layer="features.9")))
    out = console.file.getvalue()
    red, dim = "\x1b[31m", "\x1b[2m"
    assert f"{dim}dead-channel" in out and f"{red}dead-channel" not in out  # info: dim
    assert f"{red}negative-variance" in out  # error: red
    assert f"{dim}info    " in out and "\x1b[1;31merror   " in out
