"""stdout and stderr, and the one place where text from a file is escaped for where it goes.

Every name and byte from a file is hostile: a state-dict key or a file name may hold newlines, ESC sequences,
Rich markup, backticks, HTML or a GitHub workflow command. The renderers and the stderr printer (the sinks)
pass every file-derived string through the function for their destination:

- `terminal` / `text`: control characters (C0, C1, ESC, CR, LF, U+2028/2029, bidi and zero-width controls) and
  lone surrogates become visible escapes (`\\n`, `\\x1b`, `\\u2028`; an undecodable file-name byte `\\xff`);
  Rich only ever gets `Text` objects, never markup from data;
- `md_code` / `md_text`: markdown code spans fenced longer than any backtick run inside, other text with its
  markdown punctuation escaped and @mentions broken, so no HTML, image or mention goes live;
- `workflow_data` / `workflow_property`: GitHub Actions workflow commands (% CR LF, and : , in properties);
  `no_command_lines` makes sure no line of other output can start a workflow command (`::stop-commands::`);
- JSON is json.dumps with ensure_ascii, which writes lone surrogates as escapes instead of failing.

Output goes through `emit` (stdout) and `warn` / `error_line` / `note` (stderr): a stream that is not UTF-8
gets ASCII boxes and marks, a closed or full stream is an OutputError (exit 3), never a traceback.
Nothing here imports bncli.cli; the commands and cli.py import this module.
"""

from __future__ import annotations

import io
import os
import re
import sys

from bncli.errors import OutputError

# --------------------------------------------------------------------------- escaping


def show(path: str | os.PathLike) -> str:
    """A path as text: bytes that are not UTF-8 appear as \\xNN (control characters are escaped at the sinks)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# C0 (but space), DEL, C1; line and paragraph separators; the invisible characters that reorder or hide text
# (bidi embeddings, overrides and isolates; zero-width space/joiners; word joiner; BOM); lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    point = ord(char)
    if 0xDC80 <= point <= 0xDCFF:  # a byte that did not decode (surrogateescape, as in file names): show the byte
        return f"\\x{point - 0xDC00:02x}"
    if point <= 0xFF:
        return f"\\x{point:02x}"
    return f"\\u{point:04x}"


def terminal(value: object) -> str:
    """`value` as text with every control character, invisible formatting character and lone surrogate shown
    as a visible escape, so that what a terminal, a log or a table shows is what the file holds."""
    text = value if isinstance(value, str) else str(value)
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_visible, text)


def text(value: object, style: str = ""):
    """A Rich Text of `value`, escaped: never parsed as markup, so `[link=...]` or `[/x]` in a key stays literal."""
    from rich.text import Text

    return Text(terminal(value), style=style)


_BACKTICKS = re.compile("`+")
# Markdown punctuation that can start inline markup (emphasis, links, images, HTML, code, strike-through, tables).
# An underscore inside a word (running_mean) is never emphasis in GitHub's markdown: left as it is.
_MD_PUNCT = re.compile(r"([\\`*\[\]<>!|~&#]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def md_code(value: object, in_table: bool = True) -> str:
    """A markdown code span of `value`: fenced with more backticks than the longest run inside, so nothing in
    it is markup (HTML, images, mentions and links are inert in code). In a table cell `|` is escaped, which
    GitHub's table parser undoes before the span is read."""
    body = terminal(value)
    if in_table:
        body = body.replace("|", "\\|")
    if not body:
        return "` `"
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(body)), default=0) + 1)
    if body.startswith("`") or body.endswith("`") or (body.startswith(" ") and body.endswith(" ")):
        body = f" {body} "  # the one space each side that CommonMark strips again
    return f"{fence}{body}{fence}"


def md_text(value: object) -> str:
    """Plain markdown text of `value` (a message quoting names): its markdown punctuation escaped, @mentions
    broken with a word joiner, one line (the control characters are visible escapes)."""
    raw = value if isinstance(value, str) else str(value)
    return terminal(_MD_PUNCT.sub(r"\\\1", raw)).replace("@", "@\u2060")  # `\n` and `\x1b` are literal in markdown


def workflow_data(value: object) -> str:
    """The message of a GitHub workflow command: visible escapes first (one annotation per line of data), then
    the runner's own escapes (%25 %0D %0A, see actions/toolkit command.ts)."""
    return escape_data(terminal(value))


def workflow_property(value: object) -> str:
    """A property value of a workflow command (file=, title=): additionally ':' and ',' would end it."""
    return escape_property(terminal(value))


def escape_data(text: str) -> str:
    """The Actions runner's escaping of a command's message: GitHub decodes %25, %0D and %0A."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


_SGR = re.compile(r"\x1b\[[0-9;]*m")


def no_command_lines(output: str) -> str:
    """`output` with no line that the Actions runner would read as a workflow command (`::name ...::`, after
    any leading spaces and colour codes): such a line can only come from data (a name wrapped or folded by a
    table, a long message), and gets a visible backslash before its `::`. Lines bncli means as commands are
    written by the github renderers, which do not pass through here."""
    if "::" not in output:
        return output
    lines = output.split("\n")
    for i, line in enumerate(lines):
        plain = _SGR.sub("", line).lstrip(" \t")
        if plain.startswith("::"):
            at = line.index("::", len(line) - len(line.lstrip(" \t")))
            # take the place of a leading space where there is one, so that a table row keeps its alignment
            lines[i] = line[: at - 1] + "\\" + line[at:] if at and line[at - 1] == " " else line[:at] + "\\" + line[at:]
    return "\n".join(lines)


# --------------------------------------------------------------------------- ASCII fallback

# Unicode marks bncli itself writes, each to one ASCII character of the same width (Rich draws ASCII boxes on its
# own when the stream is not UTF-8).
ASCII_MARKS = str.maketrans({
    "▁": "_", "▂": ".", "▃": "-", "▄": "~", "▅": "=", "▆": "+", "▇": "*", "█": "#",
    "×": "x", "○": "o", "·": ".", "→": ">", "Δ": "d", "…": ".", "≤": "<", "≥": ">", "—": "-", "–": "-",
    "❌": "x", "⚠": "!", "ℹ": "i", "\ufe0f": "",
})  # fmt: skip


def is_utf8(stream) -> bool:
    encoding = (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "").replace("_", "")
    return encoding in ("utf8", "utf8sig")


def _encodable(output: str, stream) -> str:
    """`output` as `stream` can encode it: bncli's marks in ASCII on a stream that is not UTF-8, anything else
    that does not encode (a name in another script, a lone surrogate) as a backslash escape."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    if not is_utf8(stream):
        output = output.translate(ASCII_MARKS)
    try:
        output.encode(encoding)
    except UnicodeEncodeError:
        output = output.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:
        output = output.encode("ascii", "backslashreplace").decode("ascii")
    return output


# --------------------------------------------------------------------------- streams


class StreamError(OutputError):
    """stdout or stderr cannot be written (closed, a full disk): exit 3. For stderr the error line itself
    cannot be shown, so the handler exits without one."""

    def __init__(self, stream: str, message: str) -> None:
        super().__init__(message)
        self.stream = stream


def standard_streams() -> set[str]:
    """The names of the standard streams that are closed (`bncli ... >&-`, `2>&-`). Their file descriptors get
    /dev/null, so that no file bncli opens later can take fd 1 or 2 and receive its output or torch's warnings;
    sys.stdout/sys.stderr stay None, and writing to them is a StreamError."""
    closed = set()
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(name)
            devnull = os.open(os.devnull, os.O_RDWR)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
        if getattr(sys, name) is None:
            closed.add(name)
    return closed


def _width() -> int | None:
    # Piped into a file or a CI log there is no terminal width to honour: use a wide one rather than 80,
    # so tables keep one line per row. COLUMNS, when set, wins (tests pin it).
    stream = sys.stdout
    tty = stream is not None and _isatty(stream)
    return 160 if not tty and "COLUMNS" not in os.environ else None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class _Buffer(io.StringIO):
    """Where Rich renders: a string, never the stream itself (whose errors `_write` alone handles), with the
    stream's encoding, so that Rich draws ASCII boxes for a stream that is not UTF-8."""

    def __init__(self, encoding: str) -> None:
        super().__init__()
        self._encoding = encoding

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding


def _console(name: str, **options):
    from rich.console import Console

    stream = getattr(sys, name)
    encoding = (getattr(stream, "encoding", None) or "utf-8") if stream is not None else "utf-8"
    tty = stream is not None and _isatty(stream)
    return Console(file=_Buffer(encoding), force_terminal=True if tty else None, highlight=False, **options)


def stdout_console(wide: bool = False):
    """The Rich console for tables on stdout (rendering into a string: `emit` writes it); `wide`: room for every
    column of every table (--wide)."""
    from bncli.render.layout import WIDE

    return _console("stdout", width=WIDE if wide else _width())


def stderr_console():
    """The Rich console for stderr lines (rendering into a string: `_stderr_line` writes it)."""
    return _console("stderr", soft_wrap=True)


def _stream(name: str):
    stream = getattr(sys, name)
    if stream is None:
        raise StreamError(name, f"cannot write to {name}: it is closed")
    return stream


def _write(name: str, output: str) -> None:
    stream = _stream(name)
    try:
        stream.write(_encodable(output, stream))
        stream.flush()
    except BrokenPipeError:
        # The reader left (`bncli inspect ... | head`): not an error. Point the stream at /dev/null so that the
        # interpreter's final flush does not complain; the exit code stays the command's own.
        _to_devnull(stream)
    except (OSError, ValueError) as exc:  # ValueError: the stream object was closed
        _to_devnull(stream)
        raise StreamError(name, f"cannot write the report to {name} ({getattr(exc, 'strerror', None) or exc})") from None


def _to_devnull(stream) -> None:
    """Make the interpreter's final flush of `stream` harmless (it would exit 120 on a full disk)."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    try:
        stream.flush()  # drop what is buffered: it goes to /dev/null now
    except (OSError, ValueError):
        pass


def render(renderable, console) -> str:
    """A Rich renderable as the text (with colour codes where the stream has colour) it would print."""
    console.print(renderable, crop=False)
    return console.file.getvalue()


def emit(rendered, wide: bool = False) -> None:
    """Print a rendered report on stdout: strings as they are (JSON never goes through Rich), renderables via
    Rich, rendered first so that no line can start a GitHub workflow command. A table wider than the console
    is never cropped (its columns were chosen to fit; what cannot fit is longer lines, not cut cells)."""
    if isinstance(rendered, str):
        _write("stdout", rendered + "\n")
    else:
        _write("stdout", no_command_lines(render(rendered, stdout_console(wide))))


def _stderr_line(prefix: str, style: str, message: str, message_style: str = "") -> None:
    from rich.text import Text

    line = Text(prefix, style=style)
    line.append(terminal(message), style=message_style)
    _write("stderr", no_command_lines(render(line, stderr_console())))


def error_line(message: str) -> None:
    """One `error: ...` line on stderr; `message` is escaped here (it may quote names from a file)."""
    _stderr_line("error: ", "bold red", message)


def warn(message: str) -> None:
    """One `warning: ...` line on stderr."""
    _stderr_line("warning: ", "yellow", message)


def note(message: str) -> None:
    """One plain line on stderr (a reason for an exit code, a progress note)."""
    _stderr_line("", "", message)


def write_stderr(output: str) -> None:
    """Text as it is on stderr (a traceback with --debug)."""
    _write("stderr", output)
