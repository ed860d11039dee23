"""The Typer app: global options, error handling and exit codes; the commands live in bncli/commands/."""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated

import typer

from bncli import __version__
from bncli.clistyle import BncliCommand, BncliGroup, Debug
from bncli.errors import BncliError, ExitCode, OutputError, first_line

app = typer.Typer(
    name="bncli",
    help="Audit and apply BatchNorm layers from PyTorch checkpoints, without the model's code.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's help layout everywhere (bncli/clistyle.py): one style at a terminal and in a CI log, and it skips
    # importing Rich's Markdown and Pygments (about 2x the cost of `import typer`).
    rich_markup_mode=None,
    cls=BncliGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console():
    from rich.console import Console

    # Piped into a file or a CI log there is no terminal width to honour: use a wide one rather than 80,
    # so tables keep one line per row. COLUMNS, when set, wins (tests pin it).
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=160 if wide else None)


def warn(message: str) -> None:
    from rich.text import Text

    line = Text("warning: ", style="yellow")
    line.append(message)
    stderr_console().print(line)


def error_line(message: str) -> None:
    """One `error: ...` line on stderr."""
    from rich.text import Text

    line = Text("error: ", style="bold red")
    line.append(message)  # a Text, not markup: file names may contain [brackets]
    stderr_console().print(line)


def _fail(message: str, code: int) -> typer.Exit:
    error_line(message)
    return typer.Exit(int(code))


def _internal(exc: BaseException) -> typer.Exit:
    if Debug.on:
        stderr_console().print_exception()
    detail = first_line(exc)
    message = f"internal error: {type(exc).__name__}{': ' + detail if detail != type(exc).__name__ else ''} (rerun with --debug for the traceback)"
    return _fail(message, ExitCode.INTERNAL)


def guarded(command):
    """Turn BncliError into one `error:` line and its exit code; anything else is an internal error (4)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except BncliError as exc:
            if Debug.on:
                stderr_console().print_exception()
            raise _fail(exc.message, exc.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", ExitCode.INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
            raise _internal(exc) from None

    return wrapper


def emit(rendered) -> None:
    """Print a rendered report on stdout: strings as they are (JSON never goes through Rich), renderables via Rich."""
    try:
        if isinstance(rendered, str):
            sys.stdout.write(rendered + "\n")
        else:
            stdout_console().print(rendered)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`bncli inspect ... | head`): not an error. Point stdout at /dev/null so that the
        # interpreter's final flush does not complain; the exit code stays the command's own.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as exc:
        raise OutputError(f"cannot write the report to stdout ({exc.strerror or exc})") from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bncli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", envvar="BNCLI_DEBUG", help="Show the traceback of an error (anywhere on the line).")
    ] = False,
) -> None:
    """Audit and apply BatchNorm layers from PyTorch checkpoints, without the model's code.

    Exit codes: 0 ok, 1 findings at or above --fail-on, 2 usage error, 3 input error
    (missing, corrupt, unsafe or unsupported file; bad shape or dtype), 4 internal error, 130 interrupted.
    """
    Debug.on = Debug.on or debug  # --debug after the command was taken off the line by BncliGroup


def _register() -> None:
    """Each command lives in bncli/commands/; importing them is cheap (no torch) and registers them here."""
    from bncli.commands import diff, inspect, normalize, recalibrate, rules

    for module in (inspect, normalize, diff, recalibrate, rules):
        app.command(cls=BncliCommand, **module.COMMAND)(guarded(module.run))


_register()


def main() -> None:
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - raised outside a command (an option callback): still one line
        raise SystemExit(_internal(exc).exit_code) from None
