"""JSON renderers: plain json.dumps of the report; non-finite numbers as null (strict JSON has no NaN), said in a
`non_finite` object beside them."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any

from bncli.report import InspectReport, NormalizeReport, Severity

SCHEMA_VERSION = 1


NON_FINITE = "non_finite"


def _marker(value: Any) -> str | None:
    """"inf", "-inf" or "nan" for a non-finite float; None for anything else."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return None


def _clean(value: Any) -> Any:
    """The payload as strict JSON: every non-finite float becomes null, and the object holding it gets
    `"non_finite": {key: "inf" | "-inf" | "nan"}` (for a list of numbers: a list of those markers and nulls), so
    that a reader can tell +Inf from NaN. The one place every JSON output goes through."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        out = {k: _clean(v) for k, v in value.items()}
        found: dict[str, Any] = {}
        for k, v in value.items():
            if _marker(v) is not None:
                found[k] = _marker(v)
            elif isinstance(v, (list, tuple)) and any(_marker(x) is not None for x in v):
                found[k] = [_marker(x) for x in v]
        if found:
            if NON_FINITE in value:
                raise ValueError(f"a report field is named {NON_FINITE!r}")  # a bug in bncli: the key is reserved
            out[NON_FINITE] = found
        return out
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _dump(payload: dict[str, Any]) -> str:
    return json.dumps(_clean(payload), indent=2, allow_nan=False)


def inspect_payload(report: InspectReport) -> dict[str, Any]:
    files = []
    for f in report.files:
        layers = []
        for layer in f.layers:
            entry = {
                "name": layer.name,
                "num_features": layer.num_features,
                "num_batches_tracked": layer.num_batches_tracked,
                "dtype": layer.dtype,
                "running_mean": {"min": layer.running_mean.min, "mean": layer.running_mean.center, "max": layer.running_mean.max},
                "running_var": {"min": layer.running_var.min, "median": layer.running_var.center, "max": layer.running_var.max},
                "weight_abs_min": layer.weight_abs_min,
                "flags": list(layer.flags),
                # from a whole pickled model; null for state dicts, which do not store them
                "eps": layer.eps,
                "momentum": layer.momentum,
                "class": layer.class_path,
            }
            if layer.channels is not None:
                entry["channels"] = [dataclasses.asdict(c) for c in layer.channels]
            layers.append(entry)
        files.append(
            {
                "path": f.path,
                "format": f.format,
                "container": f.container,
                "prefix": f.prefix,
                "alternatives": list(f.alternatives),
                "model_class": f.model_class,  # a whole pickled model read as data; null for state dicts
                "layers": layers,
                "findings": [dataclasses.asdict(x) for x in f.findings],
                "error": f.error,  # an extension of schema_version 1: null unless the file could not be read
            }
        )
    counts = {s.value: sum(1 for x in report.findings if x.severity is s) for s in Severity}
    summary = {
        "files": len(report.files),
        "layers": sum(len(f.layers) for f in report.files),
        "channels": sum(layer.num_features for f in report.files for layer in f.layers),
        "findings": counts,
        "unreadable": len(report.unreadable),
        "skipped": len(report.skipped),
    }
    return {"schema_version": SCHEMA_VERSION, "files": files, "skipped": list(report.skipped), "summary": summary}


def inspect_json(report: InspectReport) -> str:
    return _dump(inspect_payload(report))


def normalize_json(report: NormalizeReport) -> str:
    return _dump(
        {
            "schema_version": SCHEMA_VERSION,
            "input": {"path": report.input_path, "key": report.input_key, "shape": list(report.shape), "dtype": report.dtype},
            "mode": report.mode,
            "kind": report.kind,
            "eps": report.eps,
            "momentum": report.momentum,
            "from_layer": list(report.from_layer),  # which of eps, momentum are the checkpoint layer's own
            "affine": report.affine,
            "layer": report.layer_source,
            "channels_last": report.channels_last,
            "channels": [dataclasses.asdict(c) for c in report.channels],
            "output": report.output_path,
            "warnings": list(report.warnings),
        }
    )
