"""Read checkpoints and tensors from disk into flat {name: array} mappings, without running code from them."""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bncli.budget import Budget, human, max_load_bytes
from bncli.console import show
from bncli.errors import BncliError, InputError, UnsafeFileError, first_line
from bncli.formats.safetensors import SAFETENSORS_DTYPES, check_safetensors, open_safetensors  # noqa: F401
from bncli.layers import ROOT

# Keys under which training scripts commonly nest the model's state dict, in order of preference:
# the main model before its EMA copy, so that a checkpoint holding both reports the model.
CONTAINER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "ema",
    "model_ema",
    "state_dict_ema",
)
# Prefixes that wrappers add to every key: DataParallel/DDP, then torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".th")

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # formats.torch_legacy.MAGIC, here so that sniffing imports nothing more

# Environment variables that change torch.load's weights_only default; bncli hides them during a load so that
# neither can turn safety off, nor (both set at once) make every load fail.
TORCH_LOAD_OVERRIDES = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")

REFUSAL_ADVICE = (
    "Re-save only the weights where you trust the file (torch.save(model.state_dict(), ...)) "
    "or convert it to safetensors"
)


@dataclass(frozen=True)
class Provenance:
    """Where a mapping came from: the file, how it was stored, and what wrapping was removed."""

    path: str  # printable: bytes that are not UTF-8 appear as \xNN
    format: str  # torch-zip | torch-legacy | safetensors | npy | npz | memory (Checkpoint.from_tensors)
    container: str | None = None  # key path of the nested state dict, e.g. "state_dict"
    prefix: str | None = None  # prefix stripped from every key, e.g. "module."
    alternatives: tuple[str, ...] = ()  # other state dicts in the file (e.g. "state_dict_ema"), for --state
    model_class: str | None = None  # the class of a whole pickled model read as data, e.g. "models.yolo.DetectionModel"
    # Globals the pickle names that torch.load(weights_only=True) refuses: classes it would import (sorted, the
    # ones outside torch first), and the ones it would call (REDUCE, NEWOBJ...). Empty for plain state dicts.
    pickled_globals: tuple[str, ...] = ()
    pickled_calls: tuple[str, ...] = ()
    # The optimizer steps the checkpoint records beside the state dict (Lightning's global_step, an optimizer
    # state's step; bncli/steps.py), for rule BN016; None where it says nothing.
    optimizer_steps: int | None = None


# --------------------------------------------------------------------------- sniffing


def sniff(path: Path) -> str:
    """Name the file's format from its first bytes (never its name); raise InputError for anything bncli cannot read."""
    path = Path(path)
    size = _check_readable(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError as exc:  # EIO from a failing disk or network file system: the file, not bncli
        raise InputError(f"{show(path)}: cannot read: {exc.strerror or exc}") from None
    if size == 0 and head:
        # Files under /proc (and some FUSE mounts) report size 0 yet have content: judged by their bytes, and a
        # checkpoint among them refused plainly, since every reader relies on the file's size.
        fmt = _format_of(head)
        if fmt is None:
            raise InputError(f"{show(path)}: not a checkpoint bncli can read (looks like: {_describe(head)})")
        raise InputError(
            f"{show(path)}: reports a size of 0 bytes but holds data (a special file, such as those under /proc); "
            "copy it to a regular file first"
        )
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _sniff_zip(path)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        magic = b"\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")  # LONG1 of torch's legacy magic number
        if head[2:14] == magic or head[11:23] == magic:  # protocol 4+ puts an 8-byte FRAME first
            return "torch-legacy"
        raise InputError(
            f"{show(path)}: a Python pickle that torch.save did not write; bncli never unpickles arbitrary files. "
            "Save the tensors with torch.save or safetensors"
        )
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    prefix = _zip_prefix(path, size)
    if prefix is None:
        looks = _describe(head)
    else:
        looks = f"zip archive with {prefix} byte{'s' if prefix != 1 else ''} of other data before it, which torch.load cannot read either"
    raise InputError(f"{show(path)}: not a checkpoint bncli can read (looks like: {looks})")


def _zip_prefix(path: Path, size: int) -> int | None:
    """How many bytes precede a zip archive at the end of the file (a prefixed or self-extracting archive), or None.

    Only a guess for the message: the end record's directory is looked for where Python's zipfile would find it.
    """
    import struct

    tail_start = max(0, size - 22 - 0xFFFF)
    try:
        with path.open("rb") as fh:
            fh.seek(tail_start)
            tail = fh.read()
            pos = tail.rfind(b"PK\x05\x06", 0, max(0, len(tail) - 18))
            if pos < 0:
                return None
            cd_size, cd_offset = struct.unpack_from("<II", tail, pos + 12)
            end = tail_start + pos - (76 if tail[pos - 20 : pos - 16] == b"PK\x06\x07" else 0)
            shift = end - cd_size - cd_offset
            fh.seek(cd_offset + max(shift, 0))
            entry = fh.read(46)
    except (OSError, struct.error):
        return None
    if len(entry) < 46 or not entry.startswith(b"PK\x01\x02"):
        return None
    first = struct.unpack_from("<I", entry, 42)[0] + max(shift, 0)  # the first entry's local header
    return first if first > 0 else None


def _format_of(head: bytes) -> str | None:
    """The format the first bytes announce (before any structure check), or None."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return None


def _check_readable(path: Path) -> int:
    p = show(path)
    if path.is_symlink() and not path.exists():
        raise InputError(f"{p}: broken symbolic link (points to {show(os.readlink(path))})")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except NotADirectoryError:
        raise InputError(f"{p}: no such file (a parent is not a folder)") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or a device would block or never end: only regular files are read.
        raise InputError(f"{p}: not a regular file (a pipe, socket or device)")
    if not os.access(path, os.R_OK):
        raise InputError(f"{p}: permission denied")
    return st.st_size


def _sniff_zip(path: Path) -> str:
    from bncli.formats.zipdir import list_zip

    # Read with torch's rules, refusing any layout that two zip readers could read apart (bncli/formats/zipdir.py);
    # the local headers are checked by each reader's own full read, so that they are read once.
    names = [m.name for m in list_zip(path, local_headers=False).members]
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UnsafeFileError(
            f"{show(path)}: a TorchScript archive; bncli never runs TorchScript code. "
            "Save model.state_dict() with torch.save, or convert it to safetensors"
        )
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise InputError(f"{show(path)}: not a checkpoint bncli can read (looks like: zip archive without data.pkl)")


def _describe(head: bytes) -> str:
    """A guess at what the first bytes are, from their content alone (a file under /proc reports size 0)."""
    if not head:
        return "empty file"
    if head.startswith(b"version https://git-lfs"):
        return "Git LFS pointer; run `git lfs pull` to fetch the real file"
    if head.startswith(b"\x89HDF"):
        return "HDF5 (Keras .h5?)"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data; decompress it first"
    if head[257:262] == b"ustar":
        return "tar archive; extract it first (torch checkpoints from before 2018 were tar files: not supported)"
    if head.startswith(b"GGUF"):
        return "GGUF (llama.cpp)"
    if head[:1] == b"\x08" and len(head) > 16:
        return "protobuf, perhaps ONNX or a TensorFlow graph"
    text = _as_text(head)
    if text is None:
        return "unknown binary data"
    return "JSON text" if text.lstrip().startswith(("{", "[")) else "text"


def _as_text(head: bytes) -> str | None:
    """The first bytes as text, if they are: UTF-8 (a character cut at the end of the sample allowed) with no control
    characters but tabs, newlines and form feeds; NUL bytes and other controls mean binary data."""
    for cut in range(4):
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    if not text or any(not c.isprintable() and c not in "\t\n\r\f\v" for c in text):
        return None
    return text


# --------------------------------------------------------------------------- checkpoints


UNREADABLE = "unreadable"  # the dtype of a tensor bncli does not read (Checkpoint.read says why)


class Checkpoint(Mapping[str, Any]):
    """A flat, ordered {name: tensor-like} view of one file; arrays are read only when asked for."""

    def __init__(self, provenance: Provenance, entries: dict[str, Any], reader, layer_meta: dict | None = None) -> None:
        self.provenance = provenance
        self._entries = entries  # name -> opaque handle understood by reader
        self._reader = reader
        # layer name -> formats.modules.LayerMeta, for whole pickled models (class, eps, momentum...)
        self.layer_meta = layer_meta or {}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any], path: str = "<memory>", layer_meta: dict | None = None) -> Checkpoint:
        """An in-memory checkpoint of torch tensors or numbers (a live model's `state_dict()`), format "memory":
        nothing is written or copied until a value is read (then on the CPU)."""
        return cls(Provenance(path, "memory"), dict(tensors), _TorchReader(), layer_meta)

    def __getitem__(self, name: str) -> Any:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def dtype(self, name: str) -> str:
        """The dtype as stored, e.g. "bfloat16", even though read() widens it."""
        return self._reader.dtype(self._entries[name])

    def read(self, name: str):
        """The value as a numpy array of its own (never a view of the file, which may be replaced afterwards);
        float16 and bfloat16 are widened to float32 so statistics are computed in float32+."""
        try:
            return self._reader.read(self._entries[name])
        except BncliError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to decode a value from the file is an input error
            raise InputError(f"{self.provenance.path}: cannot read {name} ({first_line(exc)})") from None


def load_checkpoint(path: str | os.PathLike, state: str | None = None, strip_prefix: str | None = None) -> Checkpoint:
    """Open a checkpoint of any supported format and return its (unwrapped) state dict.

    `state` picks the nested state dict by key (dots walk into nested dicts); `strip_prefix` removes a prefix
    that every key must share (e.g. "model." in a Lightning checkpoint), after the wrapper prefixes.
    """
    path = Path(path)
    fmt = sniff(path)
    alternatives: tuple[str, ...] = ()
    extra: dict[str, Any] = {}
    meta: dict = {}
    if fmt == "safetensors":
        if state is not None:
            raise InputError(f"{show(path)}: --state does not apply to safetensors files, which hold one flat mapping")
        entries, reader = open_safetensors(path)
        container = None
    elif fmt in ("torch-zip", "torch-legacy"):
        obj, machine = read_torch(path, fmt)
        found, container, alternatives = find_state_dict(obj, path, state)
        if found is not obj:
            from bncli.steps import optimizer_steps

            extra["optimizer_steps"] = optimizer_steps(obj)
        if is_module(found):
            from bncli.formats.modules import ModelTooLarge, flatten

            try:
                flat, meta, extra["model_class"] = flatten(found)
            except ModelTooLarge as exc:
                raise InputError(f"{show(path)}: {exc}; refused") from None
            entries = dict(flat)
        else:
            # a record where a tensor could be (torch.nn.init.constant_(...), a custom class) is kept as a value
            # bncli cannot read, never silently dropped: a BatchNorm layer made of one is then an input error
            entries = {k: (_unreadable(v) if _is_record(v) else v) for k, v in found.items()}
        extra.update(_pickled_code(machine))
        reader = _TorchReader()
    else:  # npy, npz
        raise InputError(f"{show(path)}: a numpy {fmt} file holds tensors, not a checkpoint; use `bncli normalize` for tensors")
    entries, prefix = strip_prefixes(entries, strip_prefix, show(path))
    if prefix and meta:
        meta = {_strip(name, prefix): m for name, m in meta.items()}
    prov = Provenance(show(path), fmt, container, prefix, alternatives, **extra)
    return Checkpoint(prov, entries, reader, {(name or ROOT): m for name, m in meta.items()})


def is_module(obj: Any) -> bool:
    """A whole pickled nn.Module, read as data (the torch readers are imported only for torch files)."""
    from bncli.formats.modules import is_module as module_record

    return module_record(obj)


def _strip(name: str, prefix: str) -> str:
    """A module name with the stripped key prefix removed ("module.bn1" -> "bn1"; "module" itself -> "")."""
    dotted = name + "."
    return dotted[len(prefix):].rstrip(".") if dotted.startswith(prefix) else name


def read_torch(path: Path, fmt: str) -> tuple[Any, Any]:
    """A torch file's object as data, read by bncli's restricted pickle machine (no torch), and the machine."""
    from bncli.formats import torch_legacy, torch_zip

    budget = Budget(show(path), path.stat().st_size)
    reader = torch_zip if fmt == "torch-zip" else torch_legacy
    try:
        return reader.load(path, budget)
    except MemoryError:
        raise InputError(f"{show(path)}: not enough memory to read it") from None


def _pickled_code(machine) -> dict[str, tuple[str, ...]]:
    """The globals a pickle names that torch.load(weights_only=True) refuses (rule BN012), sorted: the ones
    outside torch first."""
    from bncli.formats.pickle_vm import torch_allows

    unsafe = [g for g in machine.globals_seen if not torch_allows(g)]
    order = sorted(unsafe, key=lambda g: (g.split(".")[0] == "torch", g))
    calls = sorted((g for g in machine.calls if g in unsafe), key=lambda g: (g.split(".")[0] == "torch", g))
    return {"pickled_globals": tuple(order), "pickled_calls": tuple(calls)}


def find_state_dict(obj: Any, path: Path, state: str | None = None) -> tuple[Mapping[str, Any], str | None, tuple[str, ...]]:
    """Locate the state dict inside common wrappings; return it, the key path used, and the other candidates."""
    p = show(path)
    obj = _plain_mappings(obj)
    candidates = _candidates(obj)
    if not state:
        _no_unread_container_before(obj, candidates, p)
    if state is not None:
        node = _walk(obj, state)
        if node is None:
            hint = f"; state dicts found: {', '.join(candidates)}" if candidates else ""
            raise InputError(f"{p}: no key {state!r} in the checkpoint; top-level keys: {_keys(obj)}{hint}")
        if not _is_state_dict(node):
            raise InputError(f"{p}: {state!r} is not a state dict of tensors (it holds {_what(node)})")
        return node, state, tuple(c for c in candidates if c != state)
    if _is_state_dict(obj):
        return obj, None, ()
    if candidates:
        return _walk(obj, candidates[0]), candidates[0], tuple(candidates[1:])
    if isinstance(obj, Mapping):
        others = [str(k) for k, v in obj.items() if _is_state_dict(v)]
        hint = f"; choose one with --state: {', '.join(others)}" if others else ""
        raise InputError(f"{p}: no state dict of tensors found; top-level keys: {_keys(obj)}{hint}")
    if _is_tensor(obj):
        raise InputError(f"{p}: holds a single tensor, not a checkpoint; use `bncli normalize` for tensors")
    raise InputError(f"{p}: holds {_what(obj)} at the top level, not a state dict")


def _as_mapping(value: Any) -> Any:
    """A dict subclass the pickle built (an Instance record with items, e.g. `copyreg._reconstructor` or NEWOBJ of
    a class of the user's) as the plain mapping of its items, which is what load_state_dict would read from it."""
    from bncli.formats.pickle_vm import Instance

    if isinstance(value, Instance) and value.dictitems is not None and not is_module(value):
        return dict(value.dictitems)
    return value


def _plain_mappings(obj: Any) -> Any:
    """The top level and the containers under it, with dict-subclass records read as their items."""
    obj = _as_mapping(obj)
    if not isinstance(obj, Mapping):
        return obj
    out = {}
    for key, value in obj.items():
        value = _as_mapping(value)
        if isinstance(value, Mapping) and key in CONTAINER_KEYS:
            value = {k: _as_mapping(v) for k, v in value.items()}
        out[key] = value
    return out


def _no_unread_container_before(obj: Any, candidates: list[str], p: str) -> None:
    """A container key that holds a pickled object bncli cannot read as a state dict, ahead of the one it would
    choose, is refused rather than skipped: the user's code would read that one (fail closed)."""
    if not isinstance(obj, Mapping):
        return
    first = candidates[0].split(".")[0] if candidates else None
    for key in CONTAINER_KEYS:
        if key == first:
            return
        value = obj.get(key)
        if _is_record(value) and not is_module(value):
            raise InputError(
                f"{p}: {key!r} holds {_what(value)}, which bncli cannot read as a state dict; it would not audit "
                f"another one in its place{'; choose one with --state: ' + ', '.join(candidates) if candidates else ''}"
            )


def _candidates(obj: Any) -> list[str]:
    """Key paths of state dicts under the usual container keys, one level deep too, in order of preference.

    Lightning's callbacks and optimizer_states also hold tensors but are not container keys, so they never count.
    """
    found = []
    if not isinstance(obj, Mapping) or _is_state_dict(obj):
        return found
    for key in CONTAINER_KEYS:
        inner = obj.get(key)
        if _is_state_dict(inner):
            found.append(key)
        elif isinstance(inner, Mapping):
            found.extend(f"{key}.{sub}" for sub in CONTAINER_KEYS if _is_state_dict(inner.get(sub)))
    return found


def _walk(obj: Any, state: str) -> Any:
    """obj[state], or obj[a][b] for "a.b"; a key that itself contains dots is tried whole first."""
    if isinstance(obj, Mapping) and state in obj:
        return obj[state]
    head, dot, rest = state.partition(".")
    if dot and isinstance(obj, Mapping) and head in obj:
        return _walk(obj[head], rest)
    return None


def _keys(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"none ({_what(obj)})"
    keys = [str(k) for k in obj]
    return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")


def _is_tensor(value: Any) -> bool:
    """A tensor of any origin; torch and numpy are looked up, not imported: a module not loaded made no value."""
    import sys

    tensors = sys.modules.get("bncli.formats.tensors")  # not loaded: no torch file was read, so no lazy tensor
    if tensors is not None and isinstance(value, (tensors.LazyTensor, tensors.OpaqueTensor)):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def _is_state_dict(obj: Any) -> bool:
    """A mapping of string keys to tensors (num_batches_tracked may be a plain number), or a whole nn.Module
    read as data (formats.modules)."""
    if is_module(obj):
        return True
    if not isinstance(obj, Mapping) or not obj:
        return False
    has_tensor = False
    for key, value in obj.items():
        if not isinstance(key, str):
            return False
        if _is_tensor(value):
            has_tensor = True
        elif not (isinstance(value, (int, float)) and not isinstance(value, bool)) and not _is_record(value):
            return False
        elif is_module(value):  # a model beside tensors: the container, not a state dict
            return False
    return has_tensor


def _unreadable(record: Any) -> Any:
    from bncli.formats.pickle_vm import Global
    from bncli.formats.tensors import OpaqueTensor

    made_by = record.path if isinstance(record, Global) else (record.class_path or "a pickled call")
    return OpaqueTensor(f"a value built by {made_by}()" if not isinstance(record, Global) else f"a reference to {made_by}")


def _is_record(value: Any) -> bool:
    """An object the pickle would have built by calling something (bncli keeps it as an inert record)."""
    from bncli.formats.pickle_vm import Global, Instance

    return isinstance(value, (Global, Instance))


def strip_prefixes(entries: dict[str, Any], extra: str | None = None, where: str = "") -> tuple[dict[str, Any], str | None]:
    """Remove prefixes that every key shares: 'module.', '_orig_mod.' (repeatedly) and `extra` once, when given.

    `extra` may omit its trailing dot ("model" strips "model."); if not every key starts with it, that is an error.
    """
    stripped = ""
    pending = extra or None
    changed = True
    while changed and entries:
        changed = False
        options = list(WRAPPER_PREFIXES)
        if pending:
            options += [pending] if pending.endswith(".") else [pending + ".", pending]
        for prefix in options:
            if all(k.startswith(prefix) for k in entries):
                entries = {k[len(prefix) :]: v for k, v in entries.items()}
                stripped += prefix
                changed = True
                if pending and prefix in (pending, pending + "."):
                    pending = None
                break
    if pending:
        odd = next((k for k in entries if not k.startswith(pending)), None)
        count = sum(k.startswith(pending) for k in entries)
        raise InputError(
            f"{where}: cannot strip prefix {pending!r}: only {count} of {len(entries)} keys start with it (not {odd!r})"
        )
    return entries, (stripped or None)


# --------------------------------------------------------------------------- torch files


@contextlib.contextmanager
def _no_load_overrides():
    saved = {name: os.environ.pop(name) for name in TORCH_LOAD_OVERRIDES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def torch_load_checked(path: Path, fmt: str, mmap: bool = False) -> Any:
    """torch.load(weights_only=True), for the commands that must hand torch objects back to torch (recalibrate
    rewriting a torch file, torch calibration data), and only after bncli's own reader accepted the file: the
    same budgets, structure checks and refusals as every audit, so torch never sees a file bncli would refuse."""
    _obj, machine = read_torch(path, fmt)
    code = _pickled_code(machine)
    if code["pickled_globals"]:
        names = ", ".join(code["pickled_globals"][:12])
        raise UnsafeFileError(
            f"{show(path)}: only torch.load(weights_only=False) can load it, which would import {names}; bncli "
            f"reads such files as data (bncli inspect) but cannot rewrite them. {REFUSAL_ADVICE}"
        )
    import torch

    with warnings.catch_warnings():
        # torch warns (pickle protocols...) on stderr; bncli's stderr carries one line per error only.
        warnings.simplefilter("ignore")
        try:
            with _no_load_overrides(), path.open("rb") as fh:
                if mmap and fmt == "torch-zip" and _utf8_name(path):
                    # weights_only=True is passed explicitly, and never a pickle_module.
                    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                return torch.load(fh, map_location="cpu", weights_only=True)
        except BncliError:
            raise
        except MemoryError:
            raise InputError(f"{show(path)}: not enough memory to load it") from None
        except Exception as exc:  # noqa: BLE001 - torch raises many types for files its reader rejects
            raise InputError(f"{show(path)}: torch.load cannot read it ({first_line(exc)})") from None


def _utf8_name(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _TorchReader:
    @staticmethod
    def dtype(value: Any) -> str:
        from bncli.formats.tensors import OpaqueTensor

        if isinstance(value, OpaqueTensor):
            return UNREADABLE
        if hasattr(value, "dtype"):
            return str(value.dtype).removeprefix("torch.")
        return "float64" if isinstance(value, float) else "int64"

    @staticmethod
    def read(value: Any):
        """bncli's lazy tensors (bfloat16 widened), torch tensors and plain numbers, as numpy."""
        import numpy as np

        from bncli.formats.tensors import LazyTensor, OpaqueTensor

        if isinstance(value, (LazyTensor, OpaqueTensor)):
            array = value.numpy()
            return array.astype(np.float32) if array.dtype == np.float16 else array
        if hasattr(value, "detach"):
            import torch

            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                value = value.float()  # numpy has no bfloat16
            value = value.numpy()
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            # numpy would make an object array of it (and a 5000-digit int cannot even be printed)
            raise ValueError(f"a plain integer of {value.bit_length()} bits, beyond int64")
        array = np.array(value)
        # float16 widened exactly: statistics computed in float16 would underflow below eps
        return array.astype(np.float32) if array.dtype == np.float16 else array


# --------------------------------------------------------------------------- tensors


def load_tensor(path: str | os.PathLike, key: str | None = None):
    """Read one tensor (as a torch.Tensor) from .pt/.safetensors/.npy/.npz; return it and the key used."""
    import torch

    path = Path(path)
    p = show(path)
    fmt = sniff(path)
    if fmt == "npy":
        import numpy as np

        # Read, not mapped: a mapped file that shrinks while it is copied kills the process with SIGBUS.
        try:
            with path.open("rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(fh, max_header_size=100_000)
                count = 1
                for d in shape:
                    count *= d
                nbytes = count * dtype.itemsize
                cap = max_load_bytes()
                if nbytes > cap:  # checked from the header, before anything is allocated
                    raise InputError(f"{p}: declares {human(nbytes)} of data, above the {human(cap)} limit (BNCLI_MAX_LOAD_BYTES)")
                if dtype.hasobject:
                    raise InputError(f"{p}: numpy dtype {dtype} cannot become a tensor")
                data = fh.read(nbytes)
        except BncliError:
            raise
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{p}: unreadable .npy file ({first_line(exc)})") from None
        if len(data) != nbytes:
            raise InputError(f"{p}: truncated .npy file: it declares {human(nbytes)} of data and holds {human(len(data))}")
        array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        return _numpy_to_torch(path, np.ascontiguousarray(array).copy()), None
    if fmt == "npz":
        return _load_npz(path, key)
    if fmt == "safetensors":
        entries, reader = open_safetensors(path)
        name = _choose_key(path, list(entries), key)
        try:
            array = reader.read(name)
        except BncliError:
            raise
        except Exception as exc:  # noqa: BLE001 - a value that cannot be decoded is an input error
            raise InputError(f"{p}: cannot read {name} ({first_line(exc)})") from None
        if reader.dtype(name) in ("bfloat16", "float16"):
            return torch.from_numpy(array).to(getattr(torch, reader.dtype(name))), name
        return _numpy_to_torch(path, array), name
    obj, _machine = read_torch(path, fmt)
    if _is_tensor(obj):
        if key is not None:
            raise InputError(f"{p}: holds a single tensor; drop --key {key}")
        return _lazy_to_torch(path, obj, None), None
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and _is_tensor(v)}
        if tensors:
            name = _choose_key(path, list(tensors), key)
            return _lazy_to_torch(path, tensors[name], name), name
        _refuse_checkpoint_as_tensor(path, obj)
        raise InputError(f"{p}: holds no tensor at the top level (a dict with keys: {_keys(obj)}); is it a checkpoint? "
                         "`bncli inspect` reads checkpoints, `normalize` takes a tensor file")
    _refuse_checkpoint_as_tensor(path, obj)
    raise InputError(f"{p}: holds no tensor (found {_what(obj)})")


def _lazy_to_torch(path: Path, value: Any, name: str | None):
    """A tensor read by bncli's torch reader, as a torch.Tensor of its stored dtype."""
    import torch

    where = f"{show(path)}: {name}" if name else show(path)
    from bncli.formats.tensors import RAW_ONLY, LazyTensor

    try:
        array = value.numpy(raw=True) if isinstance(value, LazyTensor) else value.numpy()
    except BncliError:
        raise
    except Exception as exc:  # noqa: BLE001 - a value that cannot be decoded is an input error
        raise InputError(f"{where}: cannot read it ({first_line(exc)})") from None
    tensor = _numpy_to_torch(path, array)
    if value.dtype in RAW_ONLY:
        return tensor.view(getattr(torch, value.dtype))  # float8's bytes, as torch would have them
    return tensor.to(torch.bfloat16) if value.dtype == "bfloat16" else tensor


def _what(obj: Any) -> str:
    """What an object from a file is, in words (records name their class; never a repr of file data)."""
    from bncli.formats.pickle_vm import Global, Instance

    if is_module(obj):
        return f"a whole pickled model ({obj.class_path or 'unnamed class'})"
    if isinstance(obj, Instance):
        return f"a pickled {obj.class_path or 'object'}"
    if isinstance(obj, Global):
        return f"a reference to {obj.path}"
    return f"a {type(obj).__name__}"


def _load_npz(path: Path, key: str | None):
    import numpy as np

    from bncli.budget import Budget
    from bncli.formats.zipdir import list_zip

    p = show(path)
    # The archive passed the same no-prefix, no-gap structure checks as a torch zip (in sniff), so numpy's zipfile
    # reads the members bncli checked. Compressed members can declare far more than the file holds: each is refused
    # above a proportionate inflation, and all together above the in-memory cap, before anything is inflated.
    members = list_zip(path).members
    declared = 0
    for m in members:
        Budget.check_ratio(p, m.size, m.compressed_size, f"member {m.name!r}")
        declared += m.size
    if declared > max_load_bytes():
        raise InputError(f"{p}: declares {human(declared)} of arrays, above the limit (BNCLI_MAX_LOAD_BYTES)")
    try:
        with np.load(path, allow_pickle=False) as z:
            name = _choose_key(path, list(z.files), key)
            member = next(m for m in members if m.name == name + ".npy")
            _check_npy_header(path, member)
            return _numpy_to_torch(path, z[name]), name
    except BncliError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib and numpy each raise their own types for damage
        raise InputError(f"{p}: corrupt .npz file ({first_line(exc)})") from None


def _check_npy_header(path: Path, member) -> None:
    """A member's .npy header must declare exactly the bytes the member holds: numpy allocates what it declares."""
    import io
    import zlib

    import numpy as np

    with path.open("rb") as fh:
        fh.seek(member.data_offset)
        raw = fh.read(min(member.compressed_size, 1 << 16))
    head = zlib.decompressobj(-15).decompress(raw, 1 << 16) if member.method == 8 else raw
    buf = io.BytesIO(head)
    version = np.lib.format.read_magic(buf)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(buf, max_header_size=1 << 16)
    count = 1
    for d in shape:
        count *= d
    declared = buf.tell() + count * dtype.itemsize
    if declared != member.size:
        raise InputError(
            f"{show(path)}: corrupt .npz file: member {member.name!r} declares an array of {human(declared)} "
            f"but holds {human(member.size)}"
        )


def _refuse_checkpoint_as_tensor(path: Path, obj: Any) -> None:
    """A wrapped checkpoint ({'state_dict': ...}, a whole model) given where a tensor belongs: say it is one."""
    from bncli.formats.modules import ModelTooLarge, flatten
    from bncli.layers import find_layers

    try:
        found, container, _ = find_state_dict(obj, path)
        keys = list(flatten(found)[0]) if is_module(found) else [k for k in found if isinstance(k, str)]
    except (InputError, ModelTooLarge):
        return
    layers = [layer.name for layer in find_layers(keys)]
    if layers:
        shown = ", ".join(layers[:3]) + (", ..." if len(layers) > 3 else "")
        raise InputError(
            f"{show(path)}: a checkpoint with {len(layers)} BatchNorm layer{'s' if len(layers) != 1 else ''} ({shown})"
            f"{f' under {container!r}' if container else ''}, not an input tensor; to apply one of its layers: bncli normalize INPUT --checkpoint "
            f"{show(path)} --layer {layers[0]}"
        )


def _choose_key(path: Path, keys: list[str], key: str | None) -> str:
    if key is not None:
        if key not in keys:
            raise InputError(f"{show(path)}: no tensor named {key!r}; it holds: {', '.join(keys)}")
        return key
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise InputError(f"{show(path)}: holds no tensor")
    from bncli.layers import find_layers

    layers = [layer.name for layer in find_layers(keys)]
    if layers:  # a state dict, not a batch of inputs: say so, and how to use one of its layers
        shown = ", ".join(layers[:3]) + (", ..." if len(layers) > 3 else "")
        raise InputError(
            f"{show(path)}: a checkpoint with {len(layers)} BatchNorm layer{'s' if len(layers) != 1 else ''} ({shown}), "
            f"not an input tensor; to apply one of its layers: bncli normalize INPUT --checkpoint {show(path)} "
            f"--layer {layers[0]}"
        )
    shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
    raise InputError(f"{show(path)}: holds {len(keys)} tensors; choose one with --key: {shown}")


def _numpy_to_torch(path: Path, array):
    import torch

    if array.dtype.hasobject or array.dtype.kind not in "biufc":
        raise InputError(f"{show(path)}: numpy dtype {array.dtype} cannot become a tensor")
    if not array.dtype.isnative:  # a big-endian .npy: torch takes native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(array.copy() if not array.flags.writeable else array)
