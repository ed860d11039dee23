"""The Typer app: global options, error handling and exit codes; the commands live in bncli/commands/."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from bncli import __version__
from bncli.clistyle import BncliCommand, BncliGroup, Debug
from bncli.console import StreamError, error_line, standard_streams, terminal, write_stderr
from bncli.errors import BncliError, ExitCode, Terminated, internal_message

app = typer.Typer(
    name="bncli",
    help="Audit and apply BatchNorm layers from PyTorch checkpoints, without the model's code.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    # Click's help layout everywhere (bncli/clistyle.py): one style at a terminal and in a CI log, and it skips
    # importing Rich's Markdown and Pygments (about 2x the cost of `import typer`).
    rich_markup_mode=None,
    cls=BncliGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _fail(message: str, code: int) -> typer.Exit:
    """One `error:` line and the exit code; when stderr itself cannot be written, no line and exit 3 (or the
    interrupt's own code)."""
    try:
        error_line(message)
    except StreamError:
        return typer.Exit(int(code) if code > ExitCode.INPUT else int(ExitCode.INPUT))
    return typer.Exit(int(code))


def _traceback() -> None:
    import traceback

    try:
        # a traceback quotes messages, and messages quote names from the file: escaped line by line
        write_stderr("\n".join(terminal(line) for line in traceback.format_exc().split("\n")))
    except StreamError:
        pass


def _internal(exc: BaseException) -> typer.Exit:
    if Debug.on:
        _traceback()
    return _fail(internal_message(exc), ExitCode.INTERNAL)


def guarded(command):
    """Turn BncliError into one `error:` line and its exit code; anything else is an internal error (4)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except StreamError as exc:
            if exc.stream == "stderr":  # nowhere to say it
                raise typer.Exit(int(ExitCode.INPUT)) from None
            raise _fail(exc.message, exc.exit_code) from None
        except BncliError as exc:
            if Debug.on:
                _traceback()
            if exc.quiet:
                raise typer.Exit(int(exc.exit_code)) from None
            raise _fail(exc.message, exc.exit_code) from None
        except Terminated as exc:
            raise _fail(f"terminated ({exc.signal_name})", exc.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", ExitCode.INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
            raise _internal(exc) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bncli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")
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
    closed = standard_streams()
    if "stdout" in closed:
        # `bncli ... >&-`: nobody would see the report, and an exit code alone would claim it was read.
        raise SystemExit(_fail("stdout is closed: nothing can receive the report (redirect it to /dev/null "
                               "to discard it)", ExitCode.INPUT).exit_code)
    try:
        app()
    except StreamError as exc:  # Click's own output (a usage error, --help) could not be written
        raise SystemExit(int(ExitCode.INPUT) if exc.stream == "stderr" else _fail(exc.message, exc.exit_code).exit_code) from None
    except Exception as exc:  # noqa: BLE001 - raised outside a command (an option callback): still one line
        raise SystemExit(_internal(exc).exit_code) from None
