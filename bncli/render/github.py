"""GitHub Actions workflow commands for `inspect`: each finding becomes an annotation on the checkpoint file."""

from __future__ import annotations

from bncli.console import escape_data, escape_property, no_command_lines, terminal, workflow_data, workflow_property
from bncli.render.common import skipped_line, summary_line
from bncli.report import InspectReport, Severity

LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


__all__ = ["escape_data", "escape_property", "command", "inspect_github"]


def command(level: str, message: str, **properties: str) -> str:
    """One workflow command; the message and the properties may quote a file: bncli.console escapes them."""
    props = ",".join(f"{k}={workflow_property(v)}" for k, v in properties.items())
    return f"::{level} {props}::{workflow_data(message)}"


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
    skipped = skipped_line(report)
    if skipped:
        lines.append(no_command_lines(terminal(skipped)))
    lines.append(summary_line(report))
    return "\n".join(lines)
