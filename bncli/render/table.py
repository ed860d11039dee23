"""Rich table renderers for `inspect` and `normalize`: fixed number formatting, one row per layer or channel."""

from __future__ import annotations

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from bncli.console import terminal, text
from bncli.render.common import fmt, provenance, summary_line
from bncli.render.spark import BLOCKS, var_spark, weight_spark
from bncli.report import FileReport, InspectReport, NormalizeReport, Severity

STYLES = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def inspect_table(report: InspectReport) -> RenderableType:
    parts: list[RenderableType] = []
    for file in report.files:
        parts.extend(_file_parts(file))
    parts.append(Text(summary_line(report)))
    return Group(*parts)


def _file_parts(file: FileReport) -> list[RenderableType]:
    if file.error is not None:
        return [text(f"unreadable: {file.error}", style="bold red")]
    how = provenance(file, repr)
    title = text(f"{file.path} ({how})", style="bold")
    parts: list[RenderableType] = [title]
    if file.layers:
        single = file.layers[0].channels is not None
        parts.append(_channel_table(file) if single else _FitWidth(file))
    elif not file.findings:
        parts.append(Text("no BatchNorm layers (no key prefix has both running_mean and running_var)"))
    for f in file.findings:
        line = Text()
        line.append(f"{f.severity.value:<8}", style=STYLES[f.severity])
        line.append(f"{f.rule} {f.name} ")
        if f.layer is not None:
            line.append(terminal(f.layer), style="bold")
            line.append(": ")
        line.append(terminal(f.message))
        parts.append(line)
    return parts


class _FitWidth:
    """The layer table in the most detailed variant that fits the console: wide sparklines, narrow ones, none,
    and last without the running_mean columns, so a narrow terminal loses detail instead of squeezing every cell."""

    LEVELS = ((16, True), (8, True), (8, False), (0, True), (0, False))  # (sparkline width, show the mean columns)
    FLAGS = 16  # room kept for the flags column, which folds: its natural width does not count

    def __init__(self, file: FileReport) -> None:
        self.file = file

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for spark, means in self.LEVELS:
            needed = natural_width(_layer_table(self.file, spark, means, flags=False, measuring=True))
            if needed + self.FLAGS <= options.max_width:
                break
        table = _layer_table(self.file, spark, means)
        if needed + self.FLAGS <= options.max_width:  # it fits: fix the widths, so Rich need not measure every cell
            for column, width in zip(table.columns[:-1], column_widths(table), strict=False):  # the flags column folds
                column.width = width
        yield table


def column_widths(table: Table) -> list[int]:
    """Each column's width when nothing wraps: the widest line of its header and cells."""

    def width(cell) -> int:
        text = cell.plain if isinstance(cell, Text) else str(cell)
        return max(cell_len(line) for line in text.split("\n"))

    return [max(width(c) for c in (column.header, *column.cells)) for column in table.columns]


def natural_width(table: Table) -> int:
    """The width `table` takes when nothing wraps, as Rich would measure it (a test holds the two equal) for this
    module's tables: no outer edge, one space of padding inside each column separator. Counting cell text is
    several times cheaper than Rich's Measurement, which lays every cell out."""
    return sum(column_widths(table)) + 3 * (len(table.columns) - 1)  # per separator: a space, the rule, a space


def _layer_table(file: FileReport, spark: int = 16, means: bool = True, flags: bool = True, measuring: bool = False) -> Table:
    """The layer table; `measuring` fills the sparkline cells with blocks of the same width, for a cheap trial fit."""
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("layer", overflow="fold")
    headers = ("C", "batches", *(("mean\nmin", "mean\nmean", "mean\nmax") if means else ()), "var\nmin", "var\nmedian",
               "var\nmax", "min\n|weight|")
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    if spark:
        # Per-channel shape at a glance: one block per channel (or per bucket, showing its most extreme channel).
        table.add_column("log10 var\nper channel", no_wrap=True)
        table.add_column("|weight|\nper channel", no_wrap=True)
    if flags:
        table.add_column("flags", overflow="fold")
    for layer in file.layers:
        m, v = layer.running_mean, layer.running_var
        cells = [text(layer.name), str(layer.num_features), fmt(layer.num_batches_tracked)]
        cells += [fmt(x) for x in ((m.min, m.center, m.max) if means else ())]
        cells += [fmt(x) for x in (v.min, v.center, v.max, layer.weight_abs_min)]
        if spark and measuring:
            cells += [BLOCKS[0] * min(layer.num_features, spark)] * 2
        elif spark:
            cells += [var_spark(layer.running_var_profile, spark), weight_spark(layer.weight_abs_profile, spark)]
        if flags:
            cells.append(Text(", ".join(layer.flags), style="red" if layer.flags else ""))
        table.add_row(*cells)
    return table


def _channel_table(file: FileReport) -> Table:
    layer = file.layers[0]
    count = fmt(layer.num_batches_tracked)
    table = Table(
        title=text(f"layer {layer.name}: {layer.num_features} channels, {layer.dtype}, num_batches_tracked={count}"),
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
    return Group(text(title, style="bold"), table, text(note, style="dim"))
