"""GitHub Actions workflow commands for `inspect`: each finding becomes an annotation on the checkpoint file."""

from __future__ import annotations

from bncli.render.common import summary_line
from bncli.report import InspectReport, Severity

LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def escape_data(text: str) -> str:
    """The message part: GitHub decodes %25, %0D and %0A (see actions/toolkit, command.ts)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A property value (file=, title=): additionally ':' and ',' would end it."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(level: str, message: str, **properties: str) -> str:
    props = ",".join(f"{k}={escape_property(v)}" for k, v in properties.items())
    return f"::{level} {props}::{escape_data(message)}"


def inspect_github(report: InspectReport) -> str:
    lines = []
    for file in report.files:
        if file.error is not None:
            lines.append(command("error", file.error, file=file.path, title="bncli unreadable checkpoint"))
            continue
        for f in file.findings:
            where = f" in {f.layer}" if f.layer is not None else ""
            message = f"{f.layer}: {f.message}" if f.layer is not None else f.message
            lines.append(command(LEVELS[f.severity], message, file=file.path, title=f"bncli {f.rule} {f.name}{where}"))
    lines.append(summary_line(report))
    return "\n".join(lines)
