"""Plain-text helpers shared by the renderers (no Rich, no numpy): number formatting and the summary line."""

from __future__ import annotations

import math
from collections.abc import Callable

from bncli.report import FileReport, InspectReport, Severity


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


def provenance(file: FileReport, quote: Callable[[str], str], option: Callable[[str], str] = str) -> str:
    """'torch-zip, state dict under 'model', prefix 'module.' stripped, also 'model_ema' (choose with --state)'."""
    how = [file.format or ""]
    if file.model_class:
        # "whole pickled model models.yolo.DetectionModel under 'ema', read as data (17 classes not imported)"
        model = f"whole pickled model {quote(file.model_class)}"
        if file.container:
            model += f" under {quote(file.container)}"
        n = file.pickled_globals
        how.append(model + f", read as data ({n} global{'s' if n != 1 else ''} not imported)")
    elif file.container:
        how.append(f"state dict under {quote(file.container)}")
    if file.prefix:
        how.append(f"prefix {quote(file.prefix)} stripped")
    if file.alternatives:
        how.append("also " + ", ".join(quote(a) for a in file.alternatives) + f" (choose with {option('--state')})")
    return ", ".join(how)


SKIPPED_NAMES = 5  # the skipped line names this many files, then counts the rest


def skipped_line(report: InspectReport) -> str | None:
    """'skipped 3 files that are not checkpoints: notes.txt, ...' (escaped by the renderer), or None."""
    n = len(report.skipped)
    if not n:
        return None
    names = ", ".join(report.skipped[:SKIPPED_NAMES]) + (", ..." if n > SKIPPED_NAMES else "")
    return f"skipped {n} file{'s' if n != 1 else ''} that {'are' if n != 1 else 'is'} not {'checkpoints' if n != 1 else 'a checkpoint'}: {names}"


def summary_line(report: InspectReport) -> str:
    layers = sum(len(f.layers) for f in report.files)
    channels = sum(layer.num_features for f in report.files for layer in f.layers)
    line = f"{layers} BatchNorm layer{'s' if layers != 1 else ''}, {channels} channels; findings: {finding_counts(report)}"
    if len(report.files) > 1 or report.unreadable:
        bad = len(report.unreadable)
        line = f"{len(report.files)} file{'s' if len(report.files) != 1 else ''} ({bad} unreadable), " + line
    return line


def finding_counts(report: InspectReport) -> str:
    """'3 errors, 1 warning, 2 info'."""
    counts = [(s, sum(1 for x in report.findings if x.severity is s)) for s in (Severity.ERROR, Severity.WARNING, Severity.INFO)]
    return ", ".join(f"{n} {s.value}{'s' if n != 1 and s is not Severity.INFO else ''}" for s, n in counts)
