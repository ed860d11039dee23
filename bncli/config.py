"""Settings from [tool.bncli] (and [tool.bncli.diff]) in the nearest pyproject.toml or --config, under the command-line options."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bncli.errors import UsageError
from bncli.rules import Thresholds, select_rules

# key -> (accepted Python types, description for error messages)
KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "fail-on": ((str,), "one of error, warning, info, never"),
    "format": ((str,), "an output format"),
    "select": ((list, str), "a list of rule ids or names"),
    "ignore": ((list, str), "a list of rule ids or names"),
    "require-bn": ((bool,), "true or false"),
    "eps": ((int, float), "a number >= 0"),
    "min-var": ((int, float), "a number >= 0"),
    "max-var": ((int, float), "a number > 0"),
    "max-mean": ((int, float), "a number > 0"),
    "dead-weight": ((int, float), "a number >= 0"),
    "max-fold-spread": ((int, float), "a number > 0"),
}
FAIL_ON = ("error", "warning", "info", "never")
_POSITIVE = {"max-var", "max-mean", "max-fold-spread"}


class ConfigError(UsageError):
    """A bad [tool.bncli] table or a bad option value: a usage error."""


@dataclass(frozen=True)
class Config:
    """The [tool.bncli] table (keys with dashes) and the file it came from; empty when there is none."""

    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class InspectSettings:
    fail_on: str
    format: str
    selected: frozenset[str]
    require_bn: bool
    thresholds: Thresholds


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest pyproject.toml from `start` (default: the working directory) upward."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli  # the backport of tomllib for Python 3.10
    except ImportError:
        return None
    return tomli


def load_config(start: Path | None = None, path: Path | None = None, isolated: bool = False) -> Config:
    """[tool.bncli] of the nearest pyproject.toml; `path` (--config) names the file instead: a pyproject.toml
    (its [tool.bncli]) or a TOML file holding the settings at its top level; `isolated` (--isolated): none."""
    if isolated:
        return Config()
    explicit = path is not None
    if explicit:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
    else:
        path = find_pyproject(start)
        if path is None:
            return Config()
    toml = _toml()
    if toml is None:
        if explicit:
            raise ConfigError(f"--config {path}: reading TOML on Python 3.10 needs `pip install tomli`")
        return Config(path, {}, (f"{path}: [tool.bncli] ignored: reading TOML on Python 3.10 needs `pip install tomli`",))
    try:
        with path.open("rb") as fh:
            data = toml.load(fh)
    except (OSError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    bare = explicit and path.name != "pyproject.toml" and "tool" not in data  # a bncli.toml: the settings themselves
    table = data if bare else data.get("tool", {}).get("bncli", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [tool.bncli] must be a table")
    where = "" if bare else "[tool.bncli] "
    values = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name == "diff" and isinstance(value, dict):
            values["diff"] = _diff_table(path, value)
            continue
        if name not in KEYS:
            table_name = "[tool.bncli]" if not bare else "the file"
            raise ConfigError(f"{path}: unknown key {key!r} in {table_name}; known keys: {', '.join([*KEYS, 'diff'])}")
        types, what = KEYS[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{path}: {where}{key} must be {what}; got {value!r}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: {where}{key} must be {what}; got {value!r}")
        values[name] = value
    return Config(path, values)


# [tool.bncli.diff]: the settings of `bncli diff` (the top-level eps, the layers' eps, applies to it too).
DIFF_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "format": ((str,), "one of table, json, markdown, github, sarif"),
    "eps": ((int, float), "a number >= 0"),
    "atol": ((int, float), "a number >= 0"),
    "rtol": ((int, float), "a number >= 0"),
    "fail-on-change": ((bool,), "true or false"),
    "fail-if-unchanged": ((bool,), "true or false"),
}


def _diff_table(path: Path, table: dict) -> dict[str, Any]:
    values = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name not in DIFF_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} in [tool.bncli.diff]; known keys: {', '.join(DIFF_KEYS)}")
        types, what = DIFF_KEYS[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{path}: [tool.bncli.diff] {key} must be {what}; got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not (0 <= value < float("inf")):
            raise ConfigError(f"{path}: [tool.bncli.diff] {key} must be {what}; got {value!r}")
        if name == "format":
            from bncli.render import RENDERERS, Format

            if value not in {f.value for f in Format if ("diff", f) in RENDERERS}:
                raise ConfigError(f"{path}: [tool.bncli.diff] {key} must be {what}; got {value!r}")
        values[name] = value
    return values


def resolve_diff(options: dict[str, Any], config: Config) -> dict[str, Any]:
    """diff's settings: a given option wins over [tool.bncli.diff], then the top-level eps, then the default."""
    table = config.values.get("diff", {})
    defaults = {"format": "table", "eps": 1e-5, "atol": 0.0, "rtol": 0.0, "fail-on-change": False, "fail-if-unchanged": False}
    out = {}
    for name, default in defaults.items():
        option = options.get(name)
        if option is not None and option is not False:
            out[name] = option
        elif name in table:
            out[name] = table[name]
        elif name == "eps" and "eps" in config.values:
            out[name] = config.values["eps"]
        else:
            out[name] = default
    out["format"] = getattr(out["format"], "value", out["format"])
    return out


def _listify(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def resolve_inspect(options: dict[str, Any], config: Config) -> InspectSettings:
    """Merge: a command-line option that was given (not None) wins over the config file, which wins over the default."""

    def pick(name: str, default: Any) -> tuple[Any, str]:
        option = options.get(name)
        if option is not None and option != []:
            return option, f"--{name}"
        if name in config.values:
            return config.values[name], f"{config.path} [tool.bncli] {name}"
        return default, f"--{name}"

    fail_on, source = pick("fail-on", "error")
    fail_on = getattr(fail_on, "value", fail_on)
    if fail_on not in FAIL_ON:
        raise ConfigError(f"{source}: {fail_on!r} is not one of {', '.join(FAIL_ON)}")
    fmt, source = pick("format", "table")
    fmt = getattr(fmt, "value", fmt)
    from bncli.render import Format

    if fmt not in {f.value for f in Format}:
        raise ConfigError(f"{source}: {fmt!r} is not one of {', '.join(f.value for f in Format)}")

    numbers = {}
    defaults = Thresholds()
    for name in ("eps", "min-var", "max-var", "max-mean", "dead-weight", "max-fold-spread"):
        attr = name.replace("-", "_")
        value, source = pick(name, getattr(defaults, attr))
        if value is not None:
            value = float(value)
            if not (value > 0 if name in _POSITIVE else value >= 0) or (name == "eps" and value == float("inf")):
                raise ConfigError(f"{source}: must be {KEYS[name][1]}; got {value:g}")
        numbers[attr] = value

    select, _ = pick("select", None)
    ignore, _ = pick("ignore", None)
    require_bn, _ = pick("require-bn", False)
    return InspectSettings(
        fail_on=fail_on,
        format=fmt,
        selected=select_rules(_listify(select), _listify(ignore)),
        require_bn=bool(require_bn),
        thresholds=Thresholds(**numbers),
    )
