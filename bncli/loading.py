"""Read checkpoints and tensors from disk into flat {name: array} mappings, without running code from them."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bncli.errors import InputError, UnsafeFileError

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

# safetensors dtype codes -> the names torch uses, which bncli reports everywhere.
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class Provenance:
    """Where a mapping came from: the file, how it was stored, and what wrapping was removed."""

    path: str
    format: str  # torch-zip | torch-legacy | safetensors | npy | npz
    container: str | None = None  # key path of the nested state dict, e.g. "state_dict"
    prefix: str | None = None  # prefix stripped from every key, e.g. "module."


# --------------------------------------------------------------------------- sniffing


def sniff(path: Path) -> str:
    """Name the file's format from its first bytes; raise InputError for anything bncli cannot read."""
    _check_readable(path)
    with path.open("rb") as fh:
        head = fh.read(64)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _sniff_zip(path)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        return "torch-legacy"
    if len(head) >= 10 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= size - 8:
            return "safetensors"
        raise InputError(
            f"{path}: corrupt safetensors file: its header claims {header_len} bytes but the file has {size}"
        )
    raise InputError(f"{path}: not a checkpoint bncli can read (looks like: {_describe(head, size)})")


def _check_readable(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path}: broken symbolic link (points to {os.readlink(path)})")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")


def _sniff_zip(path: Path) -> str:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{path}: corrupt zip archive ({exc})") from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UnsafeFileError(
            f"{path}: a TorchScript archive; bncli never runs TorchScript code. "
            "Save model.state_dict() with torch.save, or convert it to safetensors"
        )
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise InputError(f"{path}: not a checkpoint bncli can read (looks like: zip archive without data.pkl)")


def _describe(head: bytes, size: int) -> str:
    if size == 0:
        return "empty file"
    if head.startswith(b"version https://git-lfs"):
        return "Git LFS pointer; run `git lfs pull` to fetch the real file"
    if head.startswith(b"\x89HDF"):
        return "HDF5 (Keras .h5?)"
    if head[:1] == b"\x08" and size > 16:
        return "protobuf, perhaps ONNX"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown binary data"
    return "text"


# --------------------------------------------------------------------------- checkpoints


class Checkpoint(Mapping[str, Any]):
    """A flat, ordered {name: tensor-like} view of one file; arrays are read only when asked for."""

    def __init__(self, provenance: Provenance, entries: dict[str, Any], reader) -> None:
        self.provenance = provenance
        self._entries = entries  # name -> opaque handle understood by reader
        self._reader = reader

    def __getitem__(self, name: str) -> Any:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def dtype(self, name: str) -> str:
        return self._reader.dtype(self._entries[name])

    def read(self, name: str):
        """The value as a numpy array; bfloat16 is widened to float32 since numpy has no bfloat16."""
        return self._reader.read(self._entries[name])


def load_checkpoint(path: str | os.PathLike, state: str | None = None) -> Checkpoint:
    """Open a checkpoint of any supported format and return its (unwrapped) state dict."""
    path = Path(path)
    fmt = sniff(path)
    if fmt == "safetensors":
        entries, reader = _open_safetensors(path)
        container = None
        if state is not None:
            raise InputError(f"{path}: --state does not apply to safetensors files, which hold one flat mapping")
    elif fmt in ("torch-zip", "torch-legacy"):
        obj = _torchzip_load(path) if fmt == "torch-zip" else None
        if obj is None:
            obj = _torch_load(path, fmt)
        flat, container = find_state_dict(obj, path, state)
        entries, reader = dict(flat), _TorchReader()
    elif fmt in ("npy", "npz"):
        raise InputError(f"{path}: a numpy {fmt} file holds tensors, not a checkpoint; use `bncli normalize` for tensors")
    else:  # pragma: no cover - sniff returns only the formats above
        raise InputError(f"{path}: unsupported format {fmt}")
    entries, prefix = strip_prefixes(entries)
    return Checkpoint(Provenance(str(path), fmt, container, prefix), entries, reader)


def find_state_dict(obj: Any, path: Path, state: str | None = None) -> tuple[Mapping[str, Any], str | None]:
    """Locate the state dict inside common checkpoint wrappings; return it and the key path used."""
    if state is not None:
        node = obj
        for part in state.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise InputError(f"{path}: no key {state!r} in the checkpoint; top-level keys: {_keys(obj)}")
            node = node[part]
        if not _is_state_dict(node):
            raise InputError(f"{path}: {state!r} is not a state dict of tensors")
        return node, state
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            inner = obj.get(key)
            if _is_state_dict(inner):
                return inner, key
            if isinstance(inner, Mapping):
                for sub in CONTAINER_KEYS:
                    if _is_state_dict(inner.get(sub)):
                        return inner[sub], f"{key}.{sub}"
        raise InputError(f"{path}: no state dict of tensors found; top-level keys: {_keys(obj)}")
    if _is_tensor(obj):
        raise InputError(f"{path}: holds a single tensor, not a checkpoint; use `bncli normalize` for tensors")
    raise InputError(f"{path}: holds a {type(obj).__name__} at the top level, not a state dict")


def _keys(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"none (a {type(obj).__name__})"
    keys = [str(k) for k in obj]
    return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")


def _is_tensor(value: Any) -> bool:
    import sys

    if type(value).__name__ == "LazyTensor" and type(value).__module__ == "bncli.torchzip":
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def _is_state_dict(obj: Any) -> bool:
    """A mapping of string keys to tensors (num_batches_tracked may be a plain number)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    has_tensor = False
    for key, value in obj.items():
        if not isinstance(key, str):
            return False
        if _is_tensor(value):
            has_tensor = True
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
    return has_tensor


def strip_prefixes(entries: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Remove wrapper prefixes that every key shares ('module.', '_orig_mod.'), repeatedly."""
    stripped = ""
    changed = True
    while changed and entries:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in entries):
                entries = {k[len(prefix) :]: v for k, v in entries.items()}
                stripped += prefix
                changed = True
    return entries, (stripped or None)


# --------------------------------------------------------------------------- torch files


def _torchzip_load(path: Path) -> Any:
    """The checkpoint read without torch (bncli/torchzip.py), or None when only torch.load can judge it."""
    from bncli import torchzip

    try:
        return torchzip.load(path)
    except torchzip.Unsupported:
        return None


def _torch_load(path: Path, fmt: str) -> Any:
    import pickle

    import torch

    try:
        # weights_only=True is passed explicitly so no environment variable can turn it off.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "torch-zip"))
    except pickle.UnpicklingError as exc:
        raise _unsafe(path, fmt, exc) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: corrupt or unreadable torch file ({first})") from None


def _unsafe(path: Path, fmt: str, exc: Exception) -> InputError:
    globals_: list[str] = []
    if fmt == "torch-zip":
        import torch

        try:
            globals_ = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - fall back to the names in torch's message
            globals_ = []
    if not globals_:
        globals_ = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    if not globals_:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "corrupt pickle"
        return InputError(f"{path}: corrupt or unsafe torch pickle ({first})")
    names = ", ".join(dict.fromkeys(globals_))
    return UnsafeFileError(
        f"{path}: refused: loading it would import {names}, which can run arbitrary code. "
        "Re-save only the weights (torch.save(model.state_dict(), ...)) or convert the file to safetensors"
    )


class _TorchReader:
    @staticmethod
    def dtype(value: Any) -> str:
        if hasattr(value, "dtype"):
            return str(value.dtype).removeprefix("torch.")
        return "float64" if isinstance(value, float) else "int64"

    @staticmethod
    def read(value: Any):
        import numpy as np

        if hasattr(value, "detach"):
            import torch

            value = value.detach()
            if value.dtype == torch.bfloat16:
                value = value.float()
            return value.numpy().copy()
        return np.array(value)


# --------------------------------------------------------------------------- safetensors


def _open_safetensors(path: Path) -> tuple[dict[str, Any], _SafetensorsReader]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            infos = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError for every kind of damage
        raise InputError(f"{path}: corrupt safetensors file ({_first_line(exc)})") from None
    header = _safetensors_header(path)
    order = sorted(infos, key=lambda k: header[k]["data_offsets"][0])  # file order, not sorted names
    return {k: k for k in order}, _SafetensorsReader(path, infos, header)


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    header["__data_start__"] = 8 + n
    return header


class _SafetensorsReader:
    def __init__(self, path: Path, infos: dict[str, tuple[tuple[int, ...], str]], header: dict[str, Any]) -> None:
        self.path = path
        self.infos = infos
        self.header = header
        self._handle = None  # opened on the first read, then kept: reopening parses the header again

    def dtype(self, key: str) -> str:
        code = self.infos[key][1]
        return SAFETENSORS_DTYPES.get(code, code.lower())

    def read(self, key: str):
        import numpy as np

        shape, code = self.infos[key]
        if code == "BF16":
            # numpy has no bfloat16: read the raw 16 bits and place them in the top half of a float32.
            start, end = self.header[key]["data_offsets"]
            with self.path.open("rb") as fh:
                fh.seek(self.header["__data_start__"] + start)
                raw = np.frombuffer(fh.read(end - start), dtype="<u2")
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="numpy")
        return self._handle.get_tensor(key)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- tensors


def load_tensor(path: str | os.PathLike, key: str | None = None):
    """Read one tensor (as a torch.Tensor) from .pt/.safetensors/.npy/.npz; return it and the key used."""
    import torch

    path = Path(path)
    fmt = sniff(path)
    if fmt == "npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"{path}: unreadable .npy file ({_first_line(exc)})") from None
        return _numpy_to_torch(path, array), None
    if fmt == "npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            name = _choose_key(path, list(z.files), key)
            return _numpy_to_torch(path, z[name]), name
    if fmt == "safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                name = _choose_key(path, list(f.keys()), key)
                return f.get_tensor(name), name
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: corrupt safetensors file ({_first_line(exc)})") from None
    obj = _torch_load(path, fmt)
    if isinstance(obj, torch.Tensor):
        if key is not None:
            raise InputError(f"{path}: holds a single tensor; drop --key {key}")
        return obj, None
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            name = _choose_key(path, list(tensors), key)
            return tensors[name], name
    raise InputError(f"{path}: holds no tensor (found a {type(obj).__name__})")


def _choose_key(path: Path, keys: list[str], key: str | None) -> str:
    if key is not None:
        if key not in keys:
            raise InputError(f"{path}: no tensor named {key!r}; it holds: {', '.join(keys)}")
        return key
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise InputError(f"{path}: holds no tensor")
    raise InputError(f"{path}: holds {len(keys)} tensors; choose one with --key: {', '.join(keys)}")


def _numpy_to_torch(path: Path, array):
    import torch

    if array.dtype.hasobject or array.dtype.kind not in "biufc":
        raise InputError(f"{path}: numpy dtype {array.dtype} cannot become a tensor")
    return torch.from_numpy(array.copy() if not array.flags.writeable else array)
