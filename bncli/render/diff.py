"""Renderers for `diff` and `recalibrate`: a Rich table, JSON and a Markdown table of a DiffReport."""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from bncli.console import md_code, md_text, no_command_lines, terminal, text
from bncli.diff import CHANGED, FAIL_IF_UNCHANGED, FAIL_ON_CHANGE, IDENTICAL, SHAPE_CHANGED, DiffReport, LayerDiff
from bncli.render.github import command
from bncli.render.json import SCHEMA_VERSION, _dump
from bncli.render.layout import Column, Grid
from bncli.render.table import fmt

VERDICT_STYLES = {IDENTICAL: "green", CHANGED: "yellow", SHAPE_CHANGED: "bold red"}
LAYER_HEADERS = ("layer", "C", "verdict", "max mean\nshift", "var ratio\nmin", "var ratio\nmax", "mean\nsym KL", "Δ\nbatches",
                 "max\n|Δweight|", "max\n|Δbias|")
ZERO_VAR = 6  # where the "zero var" column goes, shown only when some layer has a zero variance
CHANNEL_HEADERS = ("ch", "mean A", "mean B", "mean shift", "var A", "var B", "var ratio", "sym KL", "Δweight", "Δbias", "changed")


def _channels(layer: LayerDiff) -> str:
    if layer.num_features_a == layer.num_features_b:
        return str(layer.num_features_a)
    return f"{layer.num_features_a}→{layer.num_features_b}"


def _delta_int(value: int | None) -> str:
    return "-" if value is None else f"{value:+d}"


def _with_zero_var(report: DiffReport) -> bool:
    return any(x.zero_var_channels for x in report.layers)


def layer_headers(report: DiffReport) -> tuple[str, ...]:
    if not _with_zero_var(report):
        return LAYER_HEADERS
    return (*LAYER_HEADERS[:ZERO_VAR], "zero\nvar", *LAYER_HEADERS[ZERO_VAR:])


def layer_cells(layer: LayerDiff, zero_var: bool = False) -> list[str]:
    cells = [
        layer.name,
        _channels(layer),
        layer.verdict,
        *(fmt(x) for x in (layer.max_shift, layer.var_ratio_min, layer.var_ratio_max, layer.mean_kl)),
        _delta_int(layer.batches_change),
        fmt(layer.weight_max_change),
        fmt(layer.bias_max_change),
    ]
    if zero_var:
        cells.insert(ZERO_VAR, "-" if layer.zero_var_channels is None else str(layer.zero_var_channels))
    return cells


def channel_cells(layer: LayerDiff) -> list[list[str]]:
    return [
        [
            str(c.index),
            *(fmt(x) for x in (c.mean_a, c.mean_b, c.shift, c.var_a, c.var_b, c.var_ratio, c.kl, c.weight_change, c.bias_change)),
            "yes" if c.changed else "",
        ]
        for c in layer.channels or ()
    ]


def summary_line(report: DiffReport) -> str:
    counts = {v: sum(1 for x in report.layers if x.verdict == v) for v in (IDENTICAL, CHANGED, SHAPE_CHANGED)}
    n = len(report.layers)
    return (
        f"{n} layer{'s' if n != 1 else ''} in both: {counts[CHANGED]} changed, {counts[SHAPE_CHANGED]} shape-changed, "
        f"{counts[IDENTICAL]} identical; {len(report.only_a)} only in A, {len(report.only_b)} only in B"
    )


def _side(path: str, state: str | None) -> str:
    return path if state is None else f"{path} [{state}]"


def _settings(report: DiffReport) -> str:
    tolerance = f", atol={report.atol:g}, rtol={report.rtol:g}" if report.atol or report.rtol else ""
    return f"eps={report.eps:g}{tolerance}"


def uneven_batches_line(report: DiffReport) -> str | None:
    """Where layers counted different numbers of new batches: which, by how much, against the most common change."""
    uneven = report.uneven_batches
    if not uneven:
        return None
    shown = ", ".join(f"{name} {change:+d}" for name, change in uneven[:10])
    if len(uneven) > 10:
        shown += f", ... ({len(uneven)} in all)"
    others = sum(1 for x in report.layers if x.batches_change == report.batches_common)
    return (f"num_batches_tracked changed unevenly: {shown}; the other {others} layer{'s' if others != 1 else ''} "
            f"{report.batches_common:+d}")


def title_line(report: DiffReport) -> str:
    return f"A = {_side(report.path_a, report.state_a)}   B = {_side(report.path_b, report.state_b)}   ({_settings(report)})"


def gate_message(report: DiffReport) -> str:
    """The one line that says why a gate failed (stderr, and the ::error annotation)."""
    names = report.violations
    if not names:
        return "--fail-if-unchanged: no BatchNorm layer is in both checkpoints"
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    what = "changed" if report.gate == FAIL_ON_CHANGE else "unchanged"
    return f"--{report.gate}: {len(names)} BatchNorm layer{'s' if len(names) != 1 else ''} {what}: {shown}"


# The columns of the layer and channel tables; `drop`: the order in which a narrow console gives them up.
LAYER_DROP = {"C": None, "layer": None, "verdict": None, "max mean\nshift": 8, "var ratio\nmin": 6, "var ratio\nmax": 7,
              "mean\nsym KL": 4, "zero\nvar": 5, "Δ\nbatches": 3, "max\n|Δweight|": 2, "max\n|Δbias|": 1}
CHANNEL_DROP = {"ch": None, "mean A": 5, "mean B": 6, "mean shift": None, "var A": 7, "var B": 8, "var ratio": None,
                "sym KL": 4, "Δweight": 2, "Δbias": 1, "changed": None}
CHANNEL_COLUMNS = tuple(Column(h, justify="left" if h == "changed" else "right", drop=CHANNEL_DROP[h]) for h in CHANNEL_HEADERS)


def layer_columns(headers: tuple[str, ...]) -> tuple[Column, ...]:
    return tuple(
        Column(h, justify="left" if h in ("layer", "verdict") else "right", wrap="." if h == "layer" else None,
               drop=LAYER_DROP[h])
        for h in headers
    )


def legend(report: DiffReport) -> str:
    zero = "zero var = channels with var 0 in A or B; " if _with_zero_var(report) else ""
    return (f"mean shift = |mean_B - mean_A| / sqrt(var_A + eps); var ratio = var_B / var_A{' where both > 0' if zero else ''}; "
            f"{zero}sym KL = KL(A||B) + KL(B||A) of N(mean, var + eps)")


def prefix_hint(report: DiffReport) -> str | None:
    """When no layer is in both files but the names match after removing a prefix ('model.features.1' in A,
    'features.1' in B), the --strip-prefix-a/-b that would match them; None otherwise."""
    if report.layers or not report.only_a or not report.only_b:
        return None
    votes: dict[tuple[str, str], int] = {}
    for x in report.only_a:
        for y in report.only_b:
            xs, ys = x.split("."), y.split(".")
            common = 0
            while common < min(len(xs), len(ys)) and xs[-1 - common] == ys[-1 - common]:
                common += 1
            if common and (common < len(xs) or common < len(ys)):
                pair = (".".join(xs[: len(xs) - common]), ".".join(ys[: len(ys) - common]))
                votes[pair] = votes.get(pair, 0) + 1
    if not votes:
        return None
    (pa, pb), count = max(votes.items(), key=lambda item: item[1])
    if count < max(1, min(len(report.only_a), len(report.only_b)) // 2):
        return None
    options = " ".join(f"--strip-prefix-{side} {prefix}" for side, prefix in (("a", pa), ("b", pb)) if prefix)
    return (f"no BatchNorm layer is in both files, but {count} match once a prefix is removed: rerun with {options}")


def diff_table(report: DiffReport) -> RenderableType:
    parts: list[RenderableType] = [text(title_line(report), style="bold")]
    single = len(report.layers) == 1 and report.layers[0].channels is not None
    if report.layers:
        zero_var = _with_zero_var(report)
        rows = []
        for layer in report.layers:
            cells = layer_cells(layer, zero_var)
            rows.append([terminal(cells[0]), cells[1], (cells[2], VERDICT_STYLES[layer.verdict]), *cells[3:]])
        parts.append(Grid(layer_columns(layer_headers(report)), rows))
    if single:
        layer = report.layers[0]
        parts.append(text(f"layer {layer.name}, channel by channel"))
        parts.append(Grid(CHANNEL_COLUMNS, channel_cells(layer)))
    for label, names in (("only in A", report.only_a), ("only in B", report.only_b)):
        if names:
            parts.append(text(f"{label}: {', '.join(names)}", style="red"))
    uneven = uneven_batches_line(report)
    if uneven:
        parts.append(text(uneven, style="yellow"))
    parts.append(Text(summary_line(report)))
    parts.append(Text(legend(report), style="dim"))
    return Group(*parts)


def diff_payload(report: DiffReport) -> dict[str, Any]:
    layers = []
    for layer in report.layers:
        entry = {k: v for k, v in dataclasses.asdict(layer).items() if k != "channels"}
        entry["changed_channels"] = list(layer.changed_channels)
        entry["batches_change"] = layer.batches_change
        if layer.channels is not None:
            entry["channels"] = [dataclasses.asdict(c) for c in layer.channels]
        layers.append(entry)
    return {
        "a": {"path": report.path_a, "prefix": report.prefix_a, "container": report.container_a},
        "b": {"path": report.path_b, "prefix": report.prefix_b, "container": report.container_b},
        "eps": report.eps,
        "atol": report.atol,
        "rtol": report.rtol,
        "gate": None if report.gate is None else {
            "option": report.gate, "failed": report.failed, "layers": list(report.violations),
        },
        "layers": layers,
        "only_a": list(report.only_a),
        "only_b": list(report.only_b),
        "uneven_batches": [{"layer": name, "batches_change": change} for name, change in report.uneven_batches],
        "summary": {
            "layers": len(report.layers),
            **{v: sum(1 for x in report.layers if x.verdict == v) for v in (IDENTICAL, CHANGED, SHAPE_CHANGED)},
            "only_a": len(report.only_a),
            "only_b": len(report.only_b),
        },
    }


def diff_json(report: DiffReport) -> str:
    return _dump({"schema_version": SCHEMA_VERSION, **diff_payload(report)})


def _md_row(cells: list[str]) -> str:
    """Cells that bncli wrote (numbers, headers, verdicts) or that are already escaped (md_code)."""
    return "| " + " | ".join(c.replace("|", "\\|") if not c.startswith("`") else c for c in cells) + " |"


def _md_table(headers: tuple[str, ...], rows: list[list[str]], left: tuple[int, ...]) -> list[str]:
    align = ["---" if i in left else "---:" for i in range(len(headers))]
    return [_md_row([h.replace("\n", " ") for h in headers]), "|" + "|".join(align) + "|", *(_md_row(r) for r in rows)]


def diff_markdown(report: DiffReport) -> str:
    lines = [f"**BatchNorm diff**: A = {md_code(_side(report.path_a, report.state_a), False)}, "
             f"B = {md_code(_side(report.path_b, report.state_b), False)} ({_settings(report)})", ""]
    if report.layers:
        zero_var = _with_zero_var(report)
        rows = [[md_code(cells[0]), *cells[1:]] for cells in (layer_cells(x, zero_var) for x in report.layers)]
        lines += _md_table(layer_headers(report), rows, left=(0, 2))
        lines.append("")
    if len(report.layers) == 1 and report.layers[0].channels is not None:
        lines += [f"Layer {md_code(report.layers[0].name, False)}, channel by channel:", ""]
        lines += _md_table(CHANNEL_HEADERS, channel_cells(report.layers[0]), left=(len(CHANNEL_HEADERS) - 1,))
        lines.append("")
    for label, names in (("Only in A", report.only_a), ("Only in B", report.only_b)):
        if names:
            lines += [f"{label}: " + ", ".join(md_code(n, False) for n in names), ""]
    if report.uneven_batches:
        shown = ", ".join(f"{md_code(name, False)} {change:+d}" for name, change in report.uneven_batches[:10])
        more = f", ... ({len(report.uneven_batches)} in all)" if len(report.uneven_batches) > 10 else ""
        others = sum(1 for x in report.layers if x.batches_change == report.batches_common)
        lines += [f"num_batches_tracked changed unevenly: {shown}{more}; the other {others} layer{'s' if others != 1 else ''} "
                  f"{report.batches_common:+d}", ""]
    lines.append(summary_line(report))
    return "\n".join(lines)


def recalibrate_lines(report) -> list[str]:
    ranks = f" on {report.world_size} processes" if report.world_size > 1 else ""
    batches = f"{report.batches} batch{'es' if report.batches != 1 else ''}"
    if report.loader is not None:
        counted = "" if report.samples is None else f"{report.samples} samples in "
        used = f"on {counted}{batches} from --loader {report.loader}"
    else:
        samples = f"{report.samples} samples"
        if report.samples != report.available:
            samples = f"{report.samples} of {report.available} samples"
        used = f"on {samples} in {batches} of up to {report.batch_size}"
    if report.check is None:
        lines = [f"recalibrated {report.checkpoint} with --model {report.model}",
                 f"{used} ({report.device}{ranks}); wrote {report.output}"]
    else:
        lines = [f"checked {report.checkpoint} with --model {report.model}",
                 f"{used} ({report.device}{ranks}); no checkpoint written", check_line(report.check)]
    if report.unused:
        what = "not measured" if report.check is not None else "left unchanged"
        lines.append(f"{what} (no input reached them): {', '.join(report.unused)}")
    return lines


def check_line(check) -> str:
    limits = f"max mean shift {check.max_shift:g}, var ratio within 1/{check.max_var_ratio:g}..{check.max_var_ratio:g}"
    if check.passed:
        return f"check passed: every layer's stored statistics fit the data ({limits})"
    n = len(check.failed)
    shown = ", ".join(check.failed[:10]) + (f", ... ({n} in all)" if n > 10 else "")
    return f"check failed: {n} layer{'s' if n != 1 else ''} beyond {limits}: {shown}"


def recalibrate_table(report) -> RenderableType:
    return Group(*(text(line) for line in recalibrate_lines(report)), diff_table(report.diff))


def recalibrate_json(report) -> str:
    return _dump(
        {
            "schema_version": SCHEMA_VERSION,
            "checkpoint": report.checkpoint,
            "output": report.output,
            "model": report.model,
            "device": report.device,
            "world_size": report.world_size,
            "samples": report.samples,
            "available": report.available,
            "batches": report.batches,
            "batch_size": report.batch_size,
            "loader": report.loader,
            "unused": list(report.unused),
            "check": None if report.check is None else {
                "max_shift": report.check.max_shift, "max_var_ratio": report.check.max_var_ratio,
                "passed": report.check.passed, "failed": list(report.check.failed),
            },
            "diff": diff_payload(report.diff),
        }
    )


def recalibrate_markdown(report) -> str:
    return "\n\n".join([*(md_text(line) for line in recalibrate_lines(report)), diff_markdown(report.diff)])


def diff_github(report: DiffReport) -> str:
    """GitHub Actions annotations on file B: one per layer that differs (and, with --fail-if-unchanged, per
    identical layer); ::error where the layer violates the gate, ::notice otherwise; then the summary."""
    violating = set(report.violations)
    title = "bncli diff" if report.gate is None else f"bncli diff --{report.gate}"

    def annotate(name: str, message: str) -> str:
        level = "error" if name in violating else "notice"
        return command(level, f"{name}: {message}", file=report.path_b, title=title)

    lines = []
    for layer in report.layers:
        if layer.verdict == IDENTICAL:
            if report.gate == FAIL_IF_UNCHANGED:
                lines.append(annotate(layer.name, "identical"))
            continue
        detail = f"{layer.num_features_a}→{layer.num_features_b} channels" if layer.verdict == SHAPE_CHANGED else (
            f"{len(layer.changed_channels)} of {layer.num_features_a} channels; max mean shift {fmt(layer.max_shift)}, "
            f"var ratio {fmt(layer.var_ratio_min)}..{fmt(layer.var_ratio_max)}, mean sym KL {fmt(layer.mean_kl)}"
            + (f", {layer.zero_var_channels} with a zero variance" if layer.zero_var_channels else "")
        )
        lines.append(annotate(layer.name, f"{layer.verdict} ({detail})"))
    for label, names in (("only in A", report.only_a), ("only in B", report.only_b)):
        lines.extend(annotate(name, label) for name in names)
    if report.gate == FAIL_IF_UNCHANGED and not report.layers:
        lines.append(command("error", gate_message(report), file=report.path_b, title=title))
    lines.append(summary_line(report))
    return "\n".join(lines)


def recalibrate_github(report) -> str:
    plain = [no_command_lines(terminal(line)) for line in recalibrate_lines(report)]  # lines, not commands
    if report.check is None:
        return "\n".join([*plain, diff_github(report.diff)])
    failed = set(report.check.failed)  # --check: an ::error on the checkpoint for each layer the data does not fit
    errors = [
        command("error", f"{x.name}: max mean shift {fmt(x.max_shift)}, var ratio {fmt(x.var_ratio_min)}.."
                f"{fmt(x.var_ratio_max)}: the stored statistics do not fit the data", file=report.checkpoint,
                title="bncli recalibrate --check")
        for x in report.diff.layers if x.name in failed
    ]
    return "\n".join([*plain, *errors])
