"""Rich table renderers for `inspect` and `normalize`: fixed number formatting, one row per layer or channel."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from bncli.console import terminal, text
from bncli.render.common import fmt, provenance, skipped_line, summary_line
from bncli.render.layout import Column, Grid
from bncli.render.spark import var_spark, weight_spark
from bncli.report import FileReport, InspectReport, NormalizeReport, Severity

STYLES = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
FLAG_STYLES = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
GROUPED_NAMES = 10  # a finding shared by more layers lists this many by name, then counts the rest

# The layer table's columns; `drop` is the order in which a narrow console gives them up (lowest first).
LAYER_COLUMNS = (
    Column("layer", justify="left", wrap="."),
    Column("C"),
    Column("batches", drop=5),
    Column("mean\nmin", drop=2),
    Column("mean\nmean", drop=1),
    Column("mean\nmax", drop=3),
    Column("var\nmin"),
    Column("var\nmedian", drop=7),
    Column("var\nmax", drop=8),
    Column("min\n|weight|", drop=6),
    Column("log10 var\nper channel", justify="left", drop=9),
    Column("|weight|\nper channel", justify="left", drop=4),
    Column("flags", justify="left", wrap=", "),
)
CHANNEL_COLUMNS = (
    Column("ch"),
    Column("running_mean"),
    Column("running_var"),
    Column("running std", drop=3),
    Column("weight", drop=2),
    Column("bias", drop=1),
    Column("flags", justify="left", wrap=", "),
)
NORMALIZE_COLUMNS = (
    Column("ch"),
    Column("in mean"),
    Column("in std"),
    Column("out mean"),
    Column("out std"),
    Column("running_mean", drop=2),
    Column("running_var", drop=1),
)


def inspect_table(report: InspectReport) -> RenderableType:
    parts: list[RenderableType] = []
    for file in report.files:
        parts.extend(_file_parts(file))
    skipped = skipped_line(report)
    if skipped:
        parts.append(text(skipped, style="dim"))
    parts.append(Text(summary_line(report)))
    return Group(*parts)


def _file_parts(file: FileReport) -> list[RenderableType]:
    if file.error is not None:
        return []  # said once, on stderr (`error:`), and counted in the summary line
    how = provenance(file, repr)
    parts: list[RenderableType] = [text(f"{file.path} ({how})", style="bold")]
    if file.layers:
        single = file.layers[0].channels is not None
        parts.extend(_channel_table(file) if single else [layer_grid(file)])
    elif not file.findings:
        parts.append(Text("no BatchNorm layers (no key prefix has both running_mean and running_var)"))
    parts.extend(finding_lines(file.findings))
    return parts


def finding_lines(findings) -> list[Text]:
    """One line per finding; the same finding (rule and message) in several layers is one line naming them."""
    groups: dict[tuple, list] = {}
    for f in findings:
        groups.setdefault((f.rule, f.name, f.severity, f.message, f.layer is None), []).append(f)
    lines = []
    for (rule, name, severity, message, _), same in groups.items():
        line = Text()
        line.append(f"{severity.value:<8}", style=STYLES[severity])
        line.append(f"{rule} {name} ")
        layers = [f.layer for f in same if f.layer is not None]
        if layers:
            shown = ", ".join(terminal(x) for x in layers[:GROUPED_NAMES])
            if len(layers) > GROUPED_NAMES:
                shown += f" and {len(layers) - GROUPED_NAMES} more layers"
            line.append(shown, style="bold")
            line.append(": ")
        line.append(terminal(message))
        lines.append(line)
    return lines


def _flag_style(flags, severities: dict[str, Severity]) -> str:
    worst = max((severities[f] for f in flags if f in severities), key=lambda s: s.rank, default=None)
    return FLAG_STYLES[worst] if worst is not None else ("red" if flags else "")


def layer_grid(file: FileReport) -> Grid:
    """The layer table: one row per layer, every cell laid out once. Whole pickled models, which state each
    layer's eps and class, get an `eps` column (and `class`, where a layer is not a plain BatchNorm2d) after `C`."""
    severities = {f.name: f.severity for f in file.findings}
    show_eps = any(layer.eps is not None for layer in file.layers)
    show_class = any(layer.class_path not in (None, PLAIN_CLASS) for layer in file.layers)
    columns = list(LAYER_COLUMNS)
    columns[2:2] = [EPS_COLUMN] * show_eps + [CLASS_COLUMN] * show_class
    rows = []
    for layer in file.layers:
        m, v = layer.running_mean, layer.running_var
        model = [fmt(layer.eps)] * show_eps + [terminal((layer.class_path or "").rpartition(".")[2])] * show_class
        rows.append([
            terminal(layer.name), str(layer.num_features), *model, fmt(layer.num_batches_tracked),
            fmt(m.min), fmt(m.center), fmt(m.max), fmt(v.min), fmt(v.center), fmt(v.max), fmt(layer.weight_abs_min),
            var_spark(layer.running_var_profile), weight_spark(layer.weight_abs_profile),
            (", ".join(layer.flags), _flag_style(layer.flags, severities)),
        ])  # fmt: skip
    return Grid(columns, rows)


# Shown only for whole pickled models (state dicts do not store a layer's eps or class).
EPS_COLUMN = Column("eps", drop=10)
CLASS_COLUMN = Column("class", justify="left", drop=0)
PLAIN_CLASS = "torch.nn.modules.batchnorm.BatchNorm2d"


def _channel_table(file: FileReport) -> list[RenderableType]:
    layer = file.layers[0]
    count = fmt(layer.num_batches_tracked)
    title = text(f"layer {layer.name}: {layer.num_features} channels, {layer.dtype}, num_batches_tracked={count}")
    severities = {f.name: f.severity for f in file.findings}
    rows = [
        [str(row.index), *(fmt(x) for x in (row.running_mean, row.running_var, row.running_std, row.weight, row.bias)),
         (", ".join(row.flags), _flag_style(row.flags, severities))]
        for row in layer.channels or ()
    ]
    return [title, Grid(CHANNEL_COLUMNS, rows)]


def _own(setting: str, report: NormalizeReport) -> str:
    return " (the layer's own)" if setting in report.from_layer else ""


def normalize_table(report: NormalizeReport) -> RenderableType:
    layer = f"layer {report.layer_source}" if report.layer_source else f"a fresh BatchNorm{report.kind}"
    if report.layer_source and report.kind != "2d":
        layer += f" (BatchNorm{report.kind})"
    momentum = "cumulative" if report.momentum is None else f"{report.momentum:g}"
    shape = "(" + ", ".join(str(d) for d in report.shape) + ")"
    source = report.input_path + (f"[{report.input_key}]" if report.input_key else "")
    title = (
        f"{report.mode} mode, {layer}: {source} {shape} {report.dtype}"
        f"{' channels-last' if report.channels_last else ''}; eps={report.eps:g}{_own('eps', report)}, "
        f"momentum={momentum}{_own('momentum', report)}, "
        f"affine={'yes' if report.affine else 'no'}"
    )
    after = "after the update" if report.mode == "train" else "used, unchanged"
    rows = [
        [str(c.index), *(fmt(x) for x in (c.input_mean, c.input_std, c.output_mean, c.output_std, c.running_mean, c.running_var))]
        for c in report.channels
    ]
    note = f"std with correction=1 (torch.Tensor.std); running statistics {after}"
    if report.output_path:
        note += f"; output written to {report.output_path}"
    return Group(text(title, style="bold"), Grid(NORMALIZE_COLUMNS, rows), text(note, style="dim"))
