"""Click-style parameters for the Typer app: values converted without pydantic, help and errors in a person's words.

typer 0.29 converts every option value through a pydantic TypeAdapter, built on first use: importing pydantic and
typer's adapters costs about 80 ms and 14 MB on every `bncli inspect`, and its errors speak pydantic ("Value error,
'jsn' is not one of ..."; "Input should be a valid number"). Its help shows type names (`<list[str]>`, `<int range>`,
`{input}`). The command class below (given to Typer with `cls=`) keeps Typer's declarations and parsing and
replaces those three things with Click's behaviour:

- conversion: each parameter gets a `Convert` for its annotation (str, Path, int, float, Enum, a list of those,
  a custom `parser`), installed where typer 0.29 caches its own (`_runtime_param`), so typer never builds an
  adapter; older typers (up to 0.28) use Click's own types, which need nothing. A parameter of another type keeps
  typer's conversion (a test checks that none does);
- help: `Usage: bncli inspect [OPTIONS] PATH...`, one metavar per option (`FLOAT`, `N`, `[table|json|...]`), one
  default style (`[default: table]`);
- usage errors: one `error:` line on stderr and a hint, exit 2.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import typer
from typer.core import TyperCommand, TyperGroup

# Where typer 0.29 caches a parameter's converter; a newer typer that renames it falls back to its own (tested).
_RUNTIME_SLOT = "_runtime_param"


def _bad(message: str, param, ctx) -> typer.BadParameter:
    return typer.BadParameter(message, ctx=ctx, param=param)


def _unwrap(annotation: Any) -> Any:
    """Optional[X] -> X."""
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def choices_of(annotation: Any) -> list[str] | None:
    annotation = _unwrap(annotation)
    if get_origin(annotation) is list:
        annotation = _unwrap(get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(m.value) for m in annotation]
    return None


class Convert:
    """One parameter's conversion, as Click does it (and with Click's messages)."""

    def __init__(self, annotation: Any, parser=None, minimum=None, maximum=None) -> None:
        annotation = _unwrap(annotation)
        self.is_list = get_origin(annotation) is list
        self.leaf = _unwrap(get_args(annotation)[0]) if self.is_list else annotation
        self.parser, self.min, self.max = parser, minimum, maximum

    @classmethod
    def supports(cls, annotation: Any, parser=None) -> bool:
        if parser is not None:
            return True
        leaf = _unwrap(annotation)
        if get_origin(leaf) is list:
            leaf = _unwrap(get_args(leaf)[0])
        return leaf in (str, Path, int, float, bool) or (isinstance(leaf, type) and issubclass(leaf, enum.Enum))

    def coerce(self, value: Any, param, ctx) -> Any:
        multi = getattr(param, "multiple", False) or getattr(param, "nargs", 1) == -1
        if value is None:
            return () if multi else None
        if multi:
            if isinstance(value, str):
                raise _bad("expected several values", param, ctx)
            return [self.one(v, param, ctx) for v in value]
        return self.one(value, param, ctx)

    def _coerce_value(self, value: Any, param, ctx) -> Any:  # typer's RuntimeParam interface, for completeness
        return self.one(value, param, ctx)

    def one(self, value: Any, param, ctx) -> Any:
        if self.parser is not None:
            try:
                return self.parser(value)
            except typer.BadParameter:
                raise
            except ValueError as exc:
                raise _bad(str(exc), param, ctx) from None
        leaf = self.leaf
        if isinstance(leaf, type) and issubclass(leaf, enum.Enum):
            if isinstance(value, leaf):
                return value
            for member in leaf:
                if str(value) == member.value:
                    return member
            names = ", ".join(str(m.value) for m in leaf)
            raise _bad(f"{str(value)!r} is not one of {names}.", param, ctx)
        if leaf is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "t", "yes", "y", "on"):
                return True
            if text in ("0", "false", "f", "no", "n", "off", ""):
                return False
            raise _bad(f"{value!r} is not a valid boolean.", param, ctx)
        if leaf in (int, float):
            return self._number(value, leaf, param, ctx)
        if isinstance(value, bytes):
            value = value.decode(sys.getfilesystemencoding(), "surrogateescape")
        return Path(value) if leaf is Path else str(value)

    def _number(self, value: Any, kind: type, param, ctx) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            text = str(value).strip()
            try:
                if not text.isascii():  # float('١') is 1.0: a number on a command line is written in ASCII digits
                    raise ValueError
                value = kind(text)
            except ValueError:
                raise _bad(f"{text!r} is not a valid {'integer' if kind is int else 'number'}.", param, ctx) from None
        value = kind(value)
        low, high = self.min, self.max
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                bounds = f"x>={low}"
            elif low is None:
                bounds = f"x<={high}"
            else:
                bounds = f"{low}<=x<={high}"
            raise _bad(f"{value} is not in the range {bounds}.", param, ctx)
        return value


def install_conversion(param) -> bool:
    """Give one typer 0.29 parameter its Click-style converter; True when done (or not needed: typer <= 0.28)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:
        return True  # an older typer: Click's own types convert, no pydantic involved
    if not hasattr(param, _RUNTIME_SLOT):
        return False
    info = descriptor.parameter_info
    parser = getattr(info, "parser", None)
    if not Convert.supports(descriptor.annotation, parser):
        return False
    setattr(param, _RUNTIME_SLOT, Convert(descriptor.annotation, parser, getattr(info, "min", None), getattr(info, "max", None)))
    return True


def _annotation(param) -> Any:
    descriptor = getattr(param, "type_descriptor", None)
    return descriptor.annotation if descriptor is not None else None


def metavar(param) -> str:
    """What a person reads for a value: the declared metavar, the choices, or FLOAT / N / PATH / TEXT."""
    if param.metavar:
        return param.metavar
    annotation = _unwrap(_annotation(param))
    choices = choices_of(annotation) if annotation is not None else None
    if choices is None and hasattr(getattr(param, "type", None), "choices"):  # an older typer's click.Choice
        choices = [str(c.value if isinstance(c, enum.Enum) else c) for c in param.type.choices]
    if choices:
        return "[" + "|".join(choices) + "]"
    leaf = _unwrap(get_args(annotation)[0]) if get_origin(annotation) is list else annotation
    if leaf is None:
        leaf = {"float": float, "integer": int, "path": Path}.get(getattr(getattr(param, "type", None), "name", ""), str)
    name = {float: "FLOAT", int: "N", Path: "PATH"}.get(leaf, "TEXT")
    if getattr(param, "param_type_name", "") == "argument":
        name = param.name.upper()
    return name + ("..." if getattr(param, "nargs", 1) == -1 else "")


def _default_text(param, ctx) -> str | None:
    show = getattr(param, "show_default", None)
    if isinstance(show, str):
        return show
    if show is False or getattr(param, "required", False):
        return None
    default = param.default
    if default is None or callable(default):
        return None
    if getattr(param, "is_flag", False):
        if getattr(param, "secondary_opts", None):
            opts = param.opts if default else param.secondary_opts
            return opts[0].lstrip("-")
        return None
    if isinstance(default, (list, tuple)):
        return None if not default else ", ".join(str(d) for d in default)
    if isinstance(default, enum.Enum):
        return str(default.value)
    if isinstance(default, float):
        return number(default)
    return str(default)


def _short_first(opts) -> list[str]:
    return sorted(opts, key=lambda o: o.startswith("--"))  # "-l, --layer", as Click writes it


def number(value: float) -> str:
    """1e-05 -> 1e-5, 0.1 -> 0.1, 8192 -> 8192."""
    return f"{value:g}".replace("e-0", "e-").replace("e+0", "e+")


def help_record(param, ctx) -> tuple[str, str] | None:
    if getattr(param, "hidden", False):
        return None
    if param.param_type_name == "argument":
        names = metavar(param)
    else:
        names = ", ".join(_short_first(param.opts))
        if getattr(param, "secondary_opts", None):
            names += " / " + ", ".join(_short_first(param.secondary_opts))
        if not getattr(param, "is_flag", False) and not getattr(param, "count", False):
            names += " " + metavar(param)
    extra = []
    default = _default_text(param, ctx)
    if default:
        extra.append(f"default: {default}")
    if param.param_type_name == "option" and getattr(param, "show_envvar", False) and param.envvar:
        extra.append("env var: " + (param.envvar if isinstance(param.envvar, str) else ", ".join(param.envvar)))
    if param.param_type_name == "option" and param.required:
        extra.append("required")
    text = getattr(param, "help", None) or ""
    if extra:
        text = f"{text}  [{'; '.join(extra)}]" if text else f"[{'; '.join(extra)}]"
    return names, text


class _Converted:
    """Install the conversion on every parameter the command parses: its own, the lazily made --help option and
    those typer adds after construction (--install-completion, --show-completion)."""

    unconverted: list[str]

    def _install(self) -> None:
        self.unconverted = []
        self._converted: set[int] = set()

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if id(param) not in self._converted:
                self._converted.add(id(param))
                if not install_conversion(param):
                    self.unconverted.append(param.name)
        return params


class BncliCommand(_Converted, TyperCommand):
    """A Typer command with Click-style conversion, help and usage errors (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["rich_markup_mode"] = None  # one help style everywhere: Click's, whose layout the records below fill
        super().__init__(*args, **kwargs)
        self._install()

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(metavar(param) if param.required else f"[{metavar(param)}]")
        return pieces

    def format_options(self, ctx, formatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = help_record(param, ctx)
            if record is not None:
                (args if param.param_type_name == "argument" else opts).append(record)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        if opts:
            with formatter.section("Options"):
                formatter.write_dl(opts)


def strip_debug(args: list[str]) -> tuple[list[str], bool]:
    """Remove `--debug` wherever it is on the line (before a `--`), so that it works before or after the command."""
    out, debug, rest = [], False, False
    for arg in args:
        if not rest and arg == "--debug":
            debug = True
            continue
        rest = rest or arg == "--"
        out.append(arg)
    return out, debug


class BncliGroup(_Converted, TyperGroup):
    """The top-level group: Click-style options, `--debug` accepted anywhere, usage errors as one `error:` line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["rich_markup_mode"] = None
        super().__init__(*args, **kwargs)
        self._install()

    def format_options(self, ctx, formatter) -> None:
        opts = [r for r in (help_record(p, ctx) for p in self.get_params(ctx)) if r is not None]
        if opts:
            with formatter.section("Options"):
                formatter.write_dl(opts)
        self.format_commands(ctx, formatter)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        args, Debug.on = strip_debug(list(args))  # set on every parse: one process may run several commands (tests)
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_exceptions() as exc:
            sys.exit(_usage_error(exc))
        sys.exit(code if isinstance(code, int) else 0)


def _click_exceptions() -> tuple[type, ...]:
    try:
        from typer._click.exceptions import ClickException  # typer >= 0.26 vendors Click
    except ImportError:
        from click.exceptions import ClickException
    return (ClickException,)


class Debug:
    """Whether --debug (anywhere on the line) or BNCLI_DEBUG asked for tracebacks; read by cli.py's handler."""

    on = False


def _usage_error(exc) -> int:
    """`error: ...` on stderr, then where to look; the exit code Click chose (2 for usage errors)."""
    message = exc.format_message()
    if message[:1].isupper() and message[1:2].islower():  # "Invalid value ..." -> "invalid value ...", as our errors
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    from bncli.console import error_line  # escapes what came from the command line for the terminal

    error_line(message + hint)
    return exc.exit_code
