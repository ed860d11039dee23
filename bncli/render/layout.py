"""Tables that never cut a cell: whole columns are dropped in a fixed order when the console is too narrow.

Every table bncli prints (inspect, --layer, diff, normalize, recalibrate) is a `Grid`: its cells are strings
laid out once, in one pass, when Rich asks for them at the console's width. A number is never cut or folded
(a cut number is a wrong number); a layer name may wrap only after one of its dots, a list of flags only after
a comma; when the columns still do not fit, the droppable ones go in their fixed order, lowest rank first, and
one dim line says which and how to see them. `--wide` (or a pipe: 160 columns) gives room for all of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style

WIDE = 100_000  # the console width of --wide: room for every column


@dataclass(frozen=True)
class Column:
    header: str  # may hold "\n": headers are aligned at the bottom
    justify: str = "right"  # or "left"
    wrap: str | None = None  # None: never wraps; "." (a name: after its dots); ", " (a list: after its commas)
    drop: int | None = None  # None: always shown; else dropped when too narrow, lower ranks first
    label: str = ""  # how the "left out" line names it (default: the header on one line)

    @property
    def name(self) -> str:
        return self.label or " ".join(self.header.split())


Cell = "str | tuple[str, str]"  # text, or (text, style); text already escaped by bncli.console


def _pieces(text: str, wrap: str | None) -> list[str]:
    """Where a cell may break: after each dot of a name, after each ', ' of a list; nowhere else."""
    if wrap is None or not text:
        return [text]
    if wrap == ".":
        return re.findall(r"[^.]*\.|[^.]+$", text) or [text]
    parts = text.split(wrap)
    return [p + wrap.rstrip() for p in parts[:-1]] + [parts[-1]]


def _wrapped(text: str, wrap: str | None, width: int) -> list[str]:
    """Greedy lines of at most `width` cells (a piece longer than that stays whole on its own line)."""
    pieces = _pieces(text, wrap)
    if len(pieces) == 1:
        return pieces
    lines, line = [], ""
    for piece in pieces:
        candidate = line + (" " if wrap == ", " and line else "") + piece
        if line and cell_len(candidate) > width:
            lines.append(line)
            line = piece
        else:
            line = candidate
    lines.append(line)
    return lines


class Grid:
    """A table of strings: bold headers, a heavy rule, ` │ ` between columns, no outer edge (Rich's look)."""

    def __init__(self, columns: Sequence[Column], rows: Sequence[Sequence], what: str = "them") -> None:
        self.columns = list(columns)
        self.rows = [[c if isinstance(c, tuple) else (c, "") for c in row] for row in rows]
        self.what = what
        # natural and minimal widths, once: one pass over the cells
        n = len(self.columns)
        self.natural = [max(cell_len(line) for line in col.header.split("\n")) for col in self.columns]
        self.minimal = list(self.natural)
        for row in self.rows:
            for i in range(n):
                cell = row[i][0]
                width = cell_len(cell)
                if width > self.natural[i]:
                    self.natural[i] = width
                wrap = self.columns[i].wrap
                piece = max(cell_len(p.rstrip()) for p in _pieces(cell, wrap)) if wrap else width
                if piece > self.minimal[i]:
                    self.minimal[i] = piece

    # ------------------------------------------------------------------ layout

    def layout(self, max_width: int) -> tuple[list[int], dict[int, int]]:
        """(the columns shown, their widths): names unwrapped if dropping columns is enough, else wrapped."""
        for wrap_names in (False, True):
            floor = [m if col.wrap == ", " or (wrap_names and col.wrap) else w
                     for col, m, w in zip(self.columns, self.minimal, self.natural, strict=True)]
            shown = list(range(len(self.columns)))
            droppable = sorted((c.drop, i) for i, c in enumerate(self.columns) if c.drop is not None)
            while _total(floor, shown) > max_width and droppable:
                shown.remove(droppable.pop(0)[1])
            if _total(floor, shown) <= max_width or wrap_names:
                return shown, self._widths(shown, floor, max_width)
        raise AssertionError("unreachable")

    def _widths(self, shown: list[int], floor: list[int], max_width: int) -> dict[int, int]:
        widths = {i: self.natural[i] for i in shown}
        excess = _total(self.natural, shown) - max_width
        while excess > 0:  # narrow the wrappable columns, widest first, down to their floor
            slack = [(widths[i] - floor[i], i) for i in shown if widths[i] > floor[i]]
            if not slack:
                break
            _, i = max(slack)
            widths[i] -= 1
            excess -= 1
        return widths

    def left_out(self, shown: list[int]) -> list[str]:
        return [c.name for i, c in enumerate(self.columns) if i not in shown]

    # ------------------------------------------------------------------ rendering

    def lines(self, max_width: int, ascii_only: bool = False) -> list[list[tuple[str, str]]]:
        """The table as lines of (text, style) runs."""
        shown, widths = self.layout(max_width)
        head, rule, cross, bar = ("|", "-", "+", "|") if ascii_only else ("┃", "━", "╇", "│")
        out: list[list[tuple[str, str]]] = []
        headers = [self.columns[i].header.split("\n") for i in shown]
        height = max(len(h) for h in headers)
        for r in range(height):
            runs: list[tuple[str, str]] = []
            for k, i in enumerate(shown):
                lines = headers[k]
                at = r - (height - len(lines))
                cell = lines[at] if at >= 0 else ""
                self._cell(runs, k, len(shown), cell, widths[i], self.columns[i].justify, "bold", head)
            out.append(runs)
        last = len(shown) - 1
        out.append([(cross.join(rule * (widths[i] + (k > 0) + (k < last)) for k, i in enumerate(shown)), "")])
        for row in self.rows:
            cells = [_wrapped(row[i][0], self.columns[i].wrap, widths[i]) for i in shown]
            for r in range(max(len(c) for c in cells)):
                runs = []
                for k, i in enumerate(shown):
                    cell = cells[k][r] if r < len(cells[k]) else ""
                    self._cell(runs, k, len(shown), cell, widths[i], self.columns[i].justify, row[i][1], bar)
                out.append(runs)
        return out

    @staticmethod
    def _cell(runs, k: int, count: int, cell: str, width: int, justify: str, style: str, bar: str) -> None:
        pad = " " * max(0, width - cell_len(cell))
        if k:
            runs.append((f" {bar} ", ""))
        if justify == "right":
            runs.append((pad, ""))
            runs.append((cell, style))
        else:
            runs.append((cell, style))
            if k < count - 1:  # no trailing spaces after the last column
                runs.append((pad, ""))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.text import Text

        width = options.max_width
        shown, _ = self.layout(width)
        styles: dict[str, Style | None] = {"": None}
        for runs in self.lines(width, options.ascii_only):
            while runs and not runs[-1][0].strip():
                runs.pop()
            if runs:
                runs[-1] = (runs[-1][0].rstrip(), runs[-1][1])
            for run, style in runs:
                if run:
                    if style not in styles:
                        styles[style] = console.get_style(style)
                    yield Segment(run, styles[style])
            yield Segment.line()
        left = self.left_out(shown)
        if left:
            yield Text(f"not shown at {width} columns: {', '.join(left)} (--wide or --format json shows {self.what})",
                       style="dim")

    def __rich_measure__(self, console: Console, options: ConsoleOptions):
        from rich.measure import Measurement

        shown, widths = self.layout(options.max_width)
        return Measurement(_total(self.minimal, shown), _total(self.natural, list(range(len(self.columns)))))


def _total(widths, shown) -> int:
    return sum(widths[i] for i in shown) + 3 * (len(shown) - 1)
