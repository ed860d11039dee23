"""Every limit a file can run into, in one place: one Budget per load, charged before anything is allocated.

A file must never make bncli hang, or take memory out of proportion to its size. Each reader asks its load's
Budget before it allocates (bytes, elements of a materialized view, pickle opcodes, items of memo-built
containers, header bytes, entries, inflated bytes of a compressed member) and the Budget refuses with one
InputError naming the limit, so that a refusal reads the same whichever reader reached it.
"""

from __future__ import annotations

import os

from bncli.errors import InputError, UsageError

# What one load may copy into memory in all; BNCLI_MAX_LOAD_BYTES raises or lowers it.
DEFAULT_MAX_LOAD_BYTES = 8 << 30
# Beyond its own size, a file may make bncli allocate at most this much (bytearray() calls, views whose
# strides repeat bytes, memo-built containers): a few KB of pickle never become gigabytes.
AMPLIFICATION_FLOOR = 64 << 20
AMPLIFICATION_FACTOR = 2
# The safetensors library refuses headers above 100 MB; so does bncli, before allocating one.
MAX_HEADER_BYTES = 100_000_000
# Entries of one safetensors header, records of one zip archive: real checkpoints hold thousands.
MAX_ENTRIES = 200_000
# A zip archive's central directory is read whole: 200,000 entries with long names fit in far less.
MAX_ZIP_DIRECTORY_BYTES = 100_000_000
# torch lists record names through a 512-byte buffer (miniz's MZ_ZIP_MAX_ARCHIVE_FILENAME_SIZE): a longer name would
# be cut short there and read whole elsewhere.
MAX_ZIP_NAME_BYTES = 511
# Opcodes of one pickle (and the items hashed): each opcode is at least one byte, a real state dict needs a few per
# tensor, and bncli's machine runs about a microsecond per opcode, so this bounds a pickle to seconds.
MAX_PICKLE_OPS = 10_000_000
# Items reachable from one container built from memo references, counted with repeats (a tuple DAG whose
# levels each refer to the level below twice has 2**depth leaves from a few bytes per level).
MAX_EXPANDED_ITEMS = 10_000_000
# A compressed member (.npz) may inflate at most this many times its stored size.
MAX_COMPRESSION_RATIO = 200
# Nesting of containers in a pickle (walks are iterative; this keeps error messages and reprs bounded).
MAX_DEPTH = 1000


def max_load_bytes() -> int:
    """The cap on what loading may copy into memory: BNCLI_MAX_LOAD_BYTES (a plain number of bytes), or 8 GiB."""
    value = os.environ.get("BNCLI_MAX_LOAD_BYTES", "").strip()
    if not value:
        return DEFAULT_MAX_LOAD_BYTES
    if not (value.isascii() and value.isdigit()):
        raise UsageError(f"BNCLI_MAX_LOAD_BYTES={ascii(value)} is not a number of bytes (e.g. 8000000000)")
    return int(value)


def human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{int(n)} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


class BudgetExceeded(InputError):
    """A file asked for more than its budget allows: refused before the allocation (exit 3)."""


class Budget:
    """What one load of one file may still do. `where` prefixes every refusal (the printable file name)."""

    def __init__(self, where: str, file_size: int = 0) -> None:
        self.where = where
        self.cap = max_load_bytes()
        # Beyond the file's own bytes, allocations in proportion to its size.
        self.extra_limit = min(self.cap, AMPLIFICATION_FLOOR + AMPLIFICATION_FACTOR * max(file_size, 0))
        self.extra_left = self.extra_limit
        self.bytes_left = self.cap
        self.ops_left = MAX_PICKLE_OPS

    def refuse(self, message: str) -> BudgetExceeded:
        return BudgetExceeded(f"{self.where}: {message}")

    def charge(self, nbytes: int, what: str) -> None:
        """Bytes copied from the file into memory (a record, a tensor's span): counted against the cap."""
        if nbytes > self.bytes_left:
            raise self.refuse(
                f"{what} needs {human(nbytes)}, above the {human(self.cap)} limit on what one load may read "
                "(BNCLI_MAX_LOAD_BYTES)"
            )
        self.bytes_left -= nbytes

    def amplify(self, nbytes: int, what: str) -> None:
        """Bytes the file makes bncli allocate beyond its own (bytearray(n), views that repeat bytes)."""
        if nbytes > self.extra_left:
            used = self.extra_limit - self.extra_left
            so_far = f", after {human(used)} already" if used else ""
            raise self.refuse(
                f"{what} would allocate {human(nbytes)} from nothing{so_far}, past the {human(self.extra_limit)} a "
                f"file of this size may make bncli allocate ({human(AMPLIFICATION_FLOOR)} plus twice its size); refused"
            )
        self.extra_left -= nbytes
        self.charge(nbytes, what)

    def ops(self, n: int = 1) -> None:
        self.ops_left -= n
        if self.ops_left < 0:
            raise self.refuse(f"its pickle runs more than {MAX_PICKLE_OPS:,} opcodes; refused")

    @staticmethod
    def check_entries(where: str, count: int, what: str) -> None:
        if count > MAX_ENTRIES:
            raise BudgetExceeded(f"{where}: {what} holds {count:,} entries, above the limit of {MAX_ENTRIES:,}")

    @staticmethod
    def check_ratio(where: str, inflated: int, stored: int, what: str) -> None:
        if inflated > MAX_COMPRESSION_RATIO * max(stored, 1) and inflated > AMPLIFICATION_FLOOR:
            raise BudgetExceeded(
                f"{where}: {what} inflates {human(stored)} to {human(inflated)} "
                f"(more than {MAX_COMPRESSION_RATIO}x): refused as a decompression bomb"
            )
