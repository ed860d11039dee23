"""Rich table renderers for `inspect` and `normalize`: fixed number formatting, one row per layer or channel."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bncli.report import FileReport, InspectReport, NormalizeReport, Severity

STYLES = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def fmt(value: float | int | None) -> str:
    """Four significant digits; '-' for a missing value, 'nan'/'inf' spelled out."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def inspect_table(report: InspectReport) -> RenderableType:
    parts: list[RenderableType] = []
    for file in report.files:
        parts.extend(_file_parts(file))
    parts.append(Text(summary_line(report)))
    return Group(*parts)


def summary_line(report: InspectReport) -> str:
    layers = sum(len(f.layers) for f in report.files)
    channels = sum(layer.num_features for f in report.files for layer in f.layers)
    counts = [(s, sum(1 for x in report.findings if x.severity is s)) for s in (Severity.ERROR, Severity.WARNING, Severity.INFO)]
    found = ", ".join(f"{n} {s.value}{'s' if n != 1 and s is not Severity.INFO else ''}" for s, n in counts)
    return f"{layers} BatchNorm layer{'s' if layers != 1 else ''}, {channels} channels; findings: {found}"


def _file_parts(file: FileReport) -> list[RenderableType]:
    how = [file.format]
    if file.container:
        how.append(f"state dict under {file.container!r}")
    if file.prefix:
        how.append(f"prefix {file.prefix!r} stripped")
    title = Text(f"{file.path} ({', '.join(how)})", style="bold")
    if not file.layers:
        return [title, Text("no BatchNorm layers (no key prefix has both running_mean and running_var)")]
    single = file.layers[0].channels is not None
    table = _channel_table(file) if single else _layer_table(file)
    parts: list[RenderableType] = [title, table]
    for f in file.findings:
        line = Text()
        line.append(f"{f.severity.value:<8}", style=STYLES[f.severity])
        line.append(f"{f.rule} {f.name} ")
        line.append(f.layer or "", style="bold")
        line.append(f": {f.message}")
        parts.append(line)
    return parts


def _layer_table(file: FileReport) -> Table:
    ids = {f.name: f.rule for f in file.findings}
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("layer", no_wrap=True)  # names are what users grep for: never broken
    for header in ("C", "batches", "mean\nmin", "mean\nmean", "mean\nmax", "var\nmin", "var\nmedian", "var\nmax", "min\n|weight|"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("flags")  # rule ids here, to stay narrow; the findings below spell them out
    for layer in file.layers:
        m, v = layer.running_mean, layer.running_var
        table.add_row(
            layer.name,
            str(layer.num_features),
            fmt(layer.num_batches_tracked),
            *(fmt(x) for x in (m.min, m.center, m.max, v.min, v.center, v.max, layer.weight_abs_min)),
            Text(" ".join(ids.get(name, name) for name in layer.flags), style="red" if layer.flags else ""),
        )
    return table


def _channel_table(file: FileReport) -> Table:
    layer = file.layers[0]
    table = Table(
        title=f"layer {layer.name}: {layer.num_features} channels, {layer.dtype}, num_batches_tracked={fmt(layer.num_batches_tracked)}",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
        header_style="bold",
    )
    table.add_column("ch", justify="right")
    for header in ("running_mean", "running_var", "running std", "weight", "bias"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("flags", overflow="fold")
    for row in layer.channels or ():
        table.add_row(
            str(row.index),
            *(fmt(x) for x in (row.running_mean, row.running_var, row.running_std, row.weight, row.bias)),
            Text(", ".join(row.flags), style="red" if row.flags else ""),
        )
    return table


def normalize_table(report: NormalizeReport) -> RenderableType:
    layer = f"layer {report.layer_source}" if report.layer_source else "a fresh BatchNorm2d"
    momentum = "cumulative" if report.momentum is None else f"{report.momentum:g}"
    shape = "(" + ", ".join(str(d) for d in report.shape) + ")"
    source = report.input_path + (f"[{report.input_key}]" if report.input_key else "")
    title = (
        f"{report.mode} mode, {layer}: {source} {shape} {report.dtype}"
        f"{' channels-last' if report.channels_last else ''}; eps={report.eps:g}, momentum={momentum}, "
        f"affine={'yes' if report.affine else 'no'}"
    )
    after = "after the update" if report.mode == "train" else "used, unchanged"
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("ch", justify="right")
    for header in ("in mean", "in std", "out mean", "out std", "running_mean", "running_var"):
        table.add_column(header, justify="right", no_wrap=True)
    for c in report.channels:
        table.add_row(
            str(c.index),
            *(fmt(x) for x in (c.input_mean, c.input_std, c.output_mean, c.output_std, c.running_mean, c.running_var)),
        )
    note = f"std with correction=1 (torch.Tensor.std); running statistics {after}"
    if report.output_path:
        note += f"; output written to {report.output_path}"
    return Group(Text(title, style="bold"), table, Text(note, style="dim"))
