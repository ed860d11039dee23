"""Exit codes and the error types that the CLI turns into one-line messages."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Every exit status bncli can return; documented in the README."""

    OK = 0
    FINDINGS = 1  # a finding at or above --fail-on
    USAGE = 2  # bad options or arguments (Typer/Click's own code)
    INPUT = 3  # missing, unreadable, corrupt, unsafe or unsupported file; bad shape or dtype
    INTERNAL = 4  # a bug in bncli: rerun with --debug for the traceback
    INTERRUPTED = 130  # SIGINT (Ctrl-C)
    TERMINATED = 143  # SIGTERM (CI cancellation, `timeout`, systemd): 128 + 15, as a shell reports it


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name): what a one-line error can quote."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def internal_message(exc: BaseException) -> str:
    """What an unexpected exception (a bug in bncli, exit 4) is reported as."""
    detail = first_line(exc)
    return (f"internal error: {type(exc).__name__}{': ' + detail if detail != type(exc).__name__ else ''} "
            "(rerun with --debug for the traceback)")


class BncliError(Exception):
    """An error the user can act on; printed as one `error:` line, never with a traceback."""

    exit_code: ExitCode = ExitCode.INTERNAL
    quiet: bool = False  # exit with exit_code but print nothing: another process says it (see RankError)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(BncliError):
    """Options or settings that cannot work together, or a choice the command cannot honour (Typer's own
    usage errors exit 2 too)."""

    exit_code = ExitCode.USAGE


class InputError(BncliError):
    """The input file cannot be used: missing, unreadable, corrupt, unsafe or unsupported."""

    exit_code = ExitCode.INPUT


class OutputError(BncliError):
    """A result cannot be written (stdout on a full disk...): not a bug in bncli, so exit 3 like an input error."""

    exit_code = ExitCode.INPUT


class UnsafeFileError(InputError):
    """The file would need arbitrary code to load (a pickled module, TorchScript...)."""


class ShapeError(InputError):
    """The tensor's shape or dtype does not fit BatchNorm2d."""


class Terminated(KeyboardInterrupt):
    """SIGTERM while bncli writes a file: handled like Ctrl-C (the temporary file is removed), then exit 143."""

    exit_code = ExitCode.TERMINATED
    signal_name = "SIGTERM"


class RankError(BncliError):
    """An error on one process of a torchrun job, raised on every process with that error's exit code: rank 0
    says it (naming the rank it happened on), the others exit quietly."""

    def __init__(self, message: str, exit_code: int, quiet: bool) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)
        self.quiet = quiet
