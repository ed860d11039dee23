"""The `inspect` core: expand the inputs, load each checkpoint, find its BatchNorm layers, run the rules, build the report."""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bncli.errors import InputError
from bncli.layers import UnknownLayer, find_layers, read_layer, select_layer
from bncli.loading import TORCH_SUFFIXES, load_checkpoint
from bncli.report import PROFILE_WIDTH, ChannelRow, FileReport, Finding, InspectReport, LayerReport, Summary
from bncli.rules import ALL_IDS, Thresholds, run_file_rules, run_rules

if TYPE_CHECKING:
    from bncli.layers import BNLayer
    from bncli.loading import Checkpoint

CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")


class NoInputFound(InputError):
    """A directory or a pattern on the command line that yields no checkpoint file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


class Inputs(list):
    """The expanded inputs (paths, or a NoInputFound in the place of an argument that yields nothing), and the
    files a directory scan looked at and left out because they are not checkpoints (`skipped`)."""

    skipped: tuple[str, ...] = ()


def expand_inputs(args: list[str | os.PathLike]) -> Inputs:
    """Files as given, directories walked, globs expanded.

    In a directory every regular file is looked at: one with a checkpoint suffix is audited, any other whose first
    bytes are a torch or safetensors checkpoint too (a file named `ENet_default`); the rest are skipped, counted,
    never an error. Hidden files and folders are left out, directory links are not followed; a recursive glob
    follows a directory link once, never into a folder it is already in (`latest -> .`).
    An argument that yields nothing becomes an InputError in its place, so that the others are still audited.
    Order is kept (directories and globs sorted) and duplicates are dropped.
    """
    out: list[str | NoInputFound] = []
    skipped: list[str] = []
    for arg in args:
        text = os.fspath(arg)
        if os.path.isdir(text):
            found = _walk(text, skipped)
            out.extend(found or [NoInputFound(text, "no checkpoint file in this directory" + _none_because(text, skipped))])
        elif not os.path.lexists(text) and glob.has_magic(text):
            # The shell did not expand it (quoted, or no match there): expand it here, as CI configs often quote globs.
            found = [f for m in glob_paths(text) for f in (_walk(m, skipped) if os.path.isdir(m) else [m])]
            out.extend(found or [NoInputFound(text, "no file matches this pattern")])
        else:
            out.append(text)
    seen: set[str] = set()
    unique = Inputs()
    for item in out:
        if isinstance(item, str):
            if item in seen:
                continue
            seen.add(item)
        unique.append(item)
    unique.skipped = tuple(dict.fromkeys(skipped))
    return unique


def _none_because(directory: str, skipped: list[str]) -> str:
    mine = [s for s in skipped if s.startswith(directory)]
    return f" ({len(mine)} other file{'s' if len(mine) != 1 else ''}, none a checkpoint)" if mine else ""


def _walk(directory: str, skipped: list[str]) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):  # directory links are not followed: no loop, nothing twice
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.lower().endswith(CHECKPOINT_SUFFIXES):
                found.append(path)
            elif not name.startswith("."):
                (found if is_checkpoint(path) else skipped).append(path)
    return found


def is_checkpoint(path: str) -> bool:
    """Whether a file without a checkpoint suffix is one, from its first bytes (what `sniff` would read)."""
    from bncli.loading import sniff

    try:
        if not os.path.isfile(path) or os.path.islink(path) and not os.path.exists(path):
            return False
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head[8:9] == b"{":  # safetensors: an 8-byte header length that fits in the file, then JSON
            length = int.from_bytes(head[:8], "little")
            if not 2 <= length <= os.path.getsize(path) - 8:
                return False
        return sniff(Path(path)) in ("torch-zip", "torch-legacy", "safetensors")
    except (InputError, OSError):
        return False


def glob_paths(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True), sorted, except that `**` enters each folder at most once (by device and
    inode): a link back up (`latest -> .`) or a loop of links ends instead of recursing forever."""
    parts = pattern.split(os.sep)
    if parts[0] == "" and len(parts) > 1:  # absolute
        start, parts = os.sep, parts[1:]
    else:
        start = os.curdir
    results: list[str] = []
    entered: set[tuple[int, int, int]] = set()

    def join(base: str, name: str) -> str:
        return name if base == os.curdir and start == os.curdir else os.path.join(base, name)

    def names(folder: str) -> list[str]:
        try:
            return sorted(os.listdir(folder))
        except OSError:
            return []

    def walk(base: str, i: int) -> None:
        if i == len(parts):
            results.append(base)
            return
        part = parts[i]
        if part == "**":
            try:
                st = os.stat(base)
            except OSError:
                return
            key = (st.st_dev, st.st_ino, i)
            if key in entered:  # this folder again, through a link: nothing new in it
                return
            entered.add(key)
            walk(base, i + 1)  # zero folders
            for name in names(base):
                sub = join(base, name)
                if name.startswith("."):
                    continue
                if os.path.isdir(sub):
                    walk(sub, i)
                elif i + 1 == len(parts):  # a trailing ** matches files too
                    results.append(sub)
        elif glob.has_magic(part):
            for name in names(base):
                if fnmatch.fnmatchcase(name, part) and (not name.startswith(".") or part.startswith(".")):
                    if i + 1 == len(parts) or os.path.isdir(join(base, name)):
                        walk(join(base, name), i + 1)
        elif part == "":
            walk(base, i + 1)  # a trailing or doubled slash
        else:
            path = join(base, part)
            if os.path.lexists(path):
                walk(path, i + 1)

    walk(start, 0)
    return sorted(dict.fromkeys(r for r in results if r != os.curdir))


def inspect_files(
    paths: list[str | os.PathLike | NoInputFound],
    *,
    layer: str | None = None,
    state: str | None = None,
    thresholds: Thresholds = Thresholds(),
    selected: frozenset[str] = ALL_IDS,
    require_bn: bool = False,
    strip_prefix: str | None = None,
) -> InspectReport:
    """Audit every input; an unreadable one becomes a FileReport with `error` set instead of stopping the rest."""
    files = []
    unknown: list[UnknownLayer] = []
    for p in paths:
        if isinstance(p, NoInputFound):
            files.append(FileReport.unreadable(p.path, p.message))
            continue
        try:
            files.append(
                inspect_file(
                    p,
                    layer=layer,
                    state=state,
                    thresholds=thresholds,
                    selected=selected,
                    require_bn=require_bn,
                    strip_prefix=strip_prefix,
                )
            )
        except (InputError, UnknownLayer) as exc:
            files.append(FileReport.unreadable(os.fspath(p), exc.message))
            if isinstance(exc, UnknownLayer):
                unknown.append(exc)
    readable = [f for f in files if f.error is None]
    if unknown and not readable and len(unknown) == sum(1 for p in paths if not isinstance(p, NoInputFound)):
        raise unknown[0]  # --layer names a layer no input has: the user's argument, one line, exit 2
    return InspectReport(tuple(files), skipped=tuple(getattr(paths, "skipped", ())))


def inspect_file(
    path: str | os.PathLike,
    *,
    layer: str | None = None,
    state: str | None = None,
    thresholds: Thresholds = Thresholds(),
    selected: frozenset[str] = ALL_IDS,
    require_bn: bool = False,
    strip_prefix: str | None = None,
) -> FileReport:
    """Audit one checkpoint; with `layer`, report only that layer, channel by channel."""
    ckpt = load_checkpoint(Path(path), state=state, strip_prefix=strip_prefix)
    return audit_checkpoint(ckpt, layer=layer, thresholds=thresholds, selected=selected, require_bn=require_bn)


def audit_checkpoint(
    ckpt: Checkpoint,
    *,
    layer: str | None = None,
    thresholds: Thresholds = Thresholds(),
    selected: frozenset[str] = ALL_IDS,
    require_bn: bool = False,
) -> FileReport:
    """Audit a loaded (or in-memory, loading.Checkpoint.from_tensors) checkpoint: the core of inspect_file."""
    keys = find_layers(ckpt)
    if layer is not None:
        keys = [select_layer(keys, layer, ckpt.provenance.path, ckpt.provenance.prefix)]
    bns = [read_layer(ckpt, k) for k in keys]
    per_layer = [run_rules(bn, thresholds, selected) for bn in bns]
    # BN014 names a layer: its flags show it; BN012 is about the file's pickle
    across = run_file_rules(bns, thresholds, selected, require_bn, ckpt.provenance)
    layers = [
        summarize_layer(bn, found + [f for f in across if f.layer == bn.name], per_channel=layer is not None)
        for bn, found in zip(bns, per_layer, strict=True)
    ]
    findings = [f for found in per_layer for f in found] + across
    prov = ckpt.provenance
    return FileReport(
        prov.path, prov.format, prov.container, prov.prefix, tuple(layers), tuple(findings), alternatives=prov.alternatives,
        model_class=prov.model_class, pickled_globals=len(prov.pickled_globals),
    )


def summarize_layer(bn: BNLayer, findings: list[Finding], per_channel: bool = False) -> LayerReport:
    import numpy as np

    weight_abs = None
    if bn.weight is not None and np.isfinite(bn.weight).any():
        weight_abs = float(np.abs(bn.weight[np.isfinite(bn.weight)]).min())
    channels = None
    if per_channel:
        channels = _channel_rows(bn, findings)
    return LayerReport(
        name=bn.name,
        num_features=bn.num_features,
        num_batches_tracked=bn.num_batches_tracked,
        dtype=bn.dtype,
        running_mean=_summary(bn.running_mean, np.mean),
        running_var=_summary(bn.running_var, np.median),
        weight_abs_min=weight_abs,
        flags=tuple(dict.fromkeys(f.name for f in findings)),
        channels=channels,
        running_var_profile=channel_profile(bn.running_var, log_scale=True),
        weight_abs_profile=None if bn.weight is None else channel_profile(np.abs(bn.weight)),
        eps=bn.eps,
        momentum=bn.momentum,
        class_path=bn.class_path,
    )


def channel_profile(values, log_scale: bool = False, width: int = PROFILE_WIDTH) -> tuple[float, ...]:
    """At most `width` channels' values, for a sparkline: all of them, or for each of `width` equal buckets of
    channels the one farthest from the median (on a log scale for variances), or an invalid one (NaN, Inf, a
    variance <= 0) when the bucket has any, so that squeezing 2048 channels into 16 keeps an outlier visible."""
    import numpy as np

    values = values.astype(np.float64)
    n = values.size
    if n <= width:
        return tuple(float(v) for v in values)
    with np.errstate(divide="ignore", invalid="ignore"):
        points = np.where(values > 0, np.log10(values), np.nan) if log_scale else values.copy()
    points[~np.isfinite(points)] = np.nan
    finite = np.sort(points[np.isfinite(points)])
    median = finite[finite.size // 2] if finite.size else 0.0
    picked = []
    for i in range(width):
        lo, hi = i * n // width, (i + 1) * n // width
        bucket, raw = points[lo:hi], values[lo:hi]
        zero = (raw == 0) if log_scale else np.zeros(raw.shape, dtype=bool)
        invalid = np.isnan(bucket) & ~zero  # NaN, Inf, a negative variance: shown before an exact 0
        if invalid.any():
            at = int(np.argmax(invalid))
        elif zero.any():
            at = int(np.argmax(zero))
        else:
            at = int(np.argmax(np.abs(bucket - median)))
        picked.append(float(values[lo + at]))
    return tuple(picked)


def _summary(values, center) -> Summary:
    import numpy as np

    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0:
        return Summary(None, None, None)
    return Summary(float(finite.min()), float(center(finite)), float(finite.max()))


def _channel_rows(bn: BNLayer, findings: list[Finding]) -> tuple[ChannelRow, ...]:
    import numpy as np

    flags: dict[int, list[str]] = {}
    whole_layer = [f.name for f in findings if not f.channels]
    for f in findings:
        for c in f.channels:
            flags.setdefault(c, []).append(f.name)
    n = min(a.size for a in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if a is not None)
    with np.errstate(invalid="ignore"):
        std = np.sqrt(bn.running_var.astype(np.float64))
    rows = []
    for c in range(n):
        rows.append(
            ChannelRow(
                index=c,
                running_mean=float(bn.running_mean[c]),
                running_var=float(bn.running_var[c]),
                running_std=float(std[c]),
                weight=None if bn.weight is None else float(bn.weight[c]),
                bias=None if bn.bias is None else float(bn.bias[c]),
                flags=tuple(dict.fromkeys(whole_layer + flags.get(c, []))),
            )
        )
    return tuple(rows)
