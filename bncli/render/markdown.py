"""Markdown renderer for `inspect`: GitHub-flavoured tables for pull-request comments and CI job summaries."""

from __future__ import annotations

from bncli.console import md_code, md_text
from bncli.render.common import finding_counts, fmt, provenance, skipped_line, summary_line
from bncli.render.spark import var_spark, weight_spark
from bncli.report import FileReport, InspectReport, Severity

ICONS = {Severity.ERROR: "❌ error", Severity.WARNING: "⚠️ warning", Severity.INFO: "ℹ️ info"}


def cell(text: str) -> str:
    """Table-cell safe text (bncli.console.md_text): no markup from a name, no pipe ending the cell, one line."""
    return md_text(text)


def code(text: str) -> str:
    """A name as a code span (bncli.console.md_code), safe in a table cell."""
    return md_code(text)


def inspect_markdown(report: InspectReport) -> str:
    lines = [f"## bncli inspect: {finding_counts(report)}", "", summary_line(report) + "."]
    skipped = skipped_line(report)
    if skipped:
        lines.extend(["", md_text(skipped) + "."])
    for file in report.files:
        lines.extend(["", *_file(file)])
    return "\n".join(lines)


def _file(file: FileReport) -> list[str]:
    lines = [f"### {md_code(file.path, in_table=False)}", ""]
    if file.error is not None:
        return [*lines, f"**unreadable:** {cell(file.error)}"]
    lines.append(provenance(file, code, code))
    if file.layers:
        lines.extend(["", *_layers(file)])
        for layer in file.layers:
            if layer.channels is not None:
                lines.extend(["", *_channels(layer)])
    if file.findings:
        lines.extend(["", "| severity | rule | layer | message |", "|---|---|---|---|"])
        for f in file.findings:
            layer = code(f.layer) if f.layer is not None else "(file)"
            lines.append(f"| {ICONS[f.severity]} | {f.rule} {f.name} | {layer} | {cell(f.message)} |")
    elif not file.layers:
        lines.extend(["", "No BatchNorm layers."])
    return lines


def _layers(file: FileReport) -> list[str]:
    lines = [
        "| layer | C | batches | var min | var median | var max | min \\|weight\\| "
        "| log10 var per channel | \\|weight\\| per channel | flags |",
        "|---|--:|--:|--:|--:|--:|--:|---|---|---|",
    ]
    for layer in file.layers:
        v = layer.running_var
        numbers = " | ".join(fmt(x) for x in (v.min, v.center, v.max, layer.weight_abs_min))
        w = weight_spark(layer.weight_abs_profile)
        lines.append(
            f"| {code(layer.name)} | {layer.num_features} | {fmt(layer.num_batches_tracked)} | {numbers} | "
            f"`{var_spark(layer.running_var_profile)}` | {f'`{w}`' if w else '-'} | {cell(', '.join(layer.flags))} |"
        )
    return lines


def _channels(layer) -> list[str]:
    lines = [
        f"Layer {code(layer.name)}, channel by channel:",
        "",
        "| ch | running_mean | running_var | running std | weight | bias | flags |",
        "|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in layer.channels:
        numbers = " | ".join(fmt(x) for x in (row.running_mean, row.running_var, row.running_std, row.weight, row.bias))
        lines.append(f"| {row.index} | {numbers} | {cell(', '.join(row.flags))} |")
    return lines
