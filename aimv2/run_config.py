"""Run descriptions in TOML: ``aimv2-train --config run.toml`` reads every flag as a key.

A config file is a flat TOML table whose keys are the command's flags without the leading dashes (``batch-size``
or ``batch_size``). Each value is turned into the command-line words it stands for and placed *before* the
words actually typed, so the parser checks a file value exactly as it checks a flag, and a flag typed on the
command line overrides the file (argparse keeps the last occurrence)::

    # run.toml
    preset = "aimv2-large-patch14-224"
    batch-size = 8192
    augment = true          # --augment;  false: --no-augment
    native-budgets = [7, 12]

An unknown key, a table, or a value of the wrong kind is a usage error naming the key and the file. Only the
standard library's ``tomllib`` (Python 3.11+; the ``tomli`` backport on 3.10) reads the file: nothing in it can
run code. :func:`dump_toml` writes a resolved configuration back in the same form (the run folder keeps one as
``config.toml``, which ``--config`` reads again).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ConfigFileError", "config_argv", "dump_toml", "read_toml"]

MAX_CONFIG_BYTES = 1 << 20  # a run description is a few hundred bytes; anything this large is not one


class ConfigFileError(ValueError):
    """A config file that cannot be used: unreadable, not TOML, an unknown key or a value of the wrong kind."""


def _tomllib():
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    try:
        import tomli
    except ImportError:
        raise ConfigFileError("--config needs Python 3.11+ (tomllib) or the tomli package on Python 3.10: "
                              "pip install tomli") from None
    return tomli


def read_toml(path: str | os.PathLike[str]) -> dict:
    """The table of TOML file ``path`` (ConfigFileError naming the file when it is missing, too large or not
    TOML)."""
    file = Path(path)
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigFileError(f"config file {file} is larger than {MAX_CONFIG_BYTES} bytes")
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigFileError(f"config file {file} does not exist") from None
    except OSError as exc:
        raise ConfigFileError(f"config file {file} cannot be read: {exc.strerror or exc}") from None
    tomllib = _tomllib()
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(f"config file {file} is not valid TOML: {str(exc).splitlines()[0]}") from None


def _actions(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """The parser's optional actions by destination (``--augment`` and ``--no-augment`` share ``augment``)."""
    found: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:  # argparse has no public listing of its actions
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            found.setdefault(action.dest, []).append(action)
    return found


def _scalar(value: object, key: str, file: Path) -> str:
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise ConfigFileError(f"config file {file}: key {key!r} must be a number or a string, got "
                              f"{_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigFileError(f"config file {file}: key {key!r} must be finite, got {value}")
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ConfigFileError(f"config file {file}: key {key!r} has a value of type {_kind(value)}")


def _kind(value: object) -> str:
    return {bool: "a boolean", dict: "a table", list: "an array"}.get(type(value), type(value).__name__)


def _words(key: str, value: object, actions: list[argparse.Action], file: Path) -> list[str]:
    """The command-line words that set ``key`` to ``value``."""
    flags = [a for a in actions if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))]
    if flags:  # a switch: true/false select the flag that stores that value
        if not isinstance(value, bool):
            raise ConfigFileError(f"config file {file}: key {key!r} must be true or false, got {value!r}")
        chosen = [a for a in flags if a.const is value]
        return [chosen[0].option_strings[0]] if chosen else []  # no flag for it: the default is that value
    action = actions[0]
    option = action.option_strings[0]
    if action.nargs == "?":  # --resume [PATH]: true is the bare flag, false leaves it unset
        if isinstance(value, bool):
            return [option] if value else []
        return [option, _scalar(value, key, file)]
    if isinstance(value, list):  # "LO,HI"-style flags take an array of scalars as well
        if not value:
            raise ConfigFileError(f"config file {file}: key {key!r} is an empty array")
        return [option, ",".join(_scalar(v, key, file) for v in value)]
    return [option, _scalar(value, key, file)]


def config_argv(path: str | os.PathLike[str], parser: argparse.ArgumentParser, *,
                skip: Sequence[str] = ("config",)) -> list[str]:
    """The command-line words equivalent to TOML file ``path`` for ``parser``.

    Args:
        path: the TOML file (a flat table; keys are flags without dashes, ``-`` or ``_`` alike).
        parser: the command's parser; its optional flags are the allowed keys.
        skip: destinations that may not appear in a file (``config`` itself: files do not include files).
    Returns:
        Words to put before the typed arguments, so that typed flags override the file.
    Raises:
        ConfigFileError: the file is unreadable or not TOML, or a key is unknown, nested or of the wrong kind
            (the message names the key and the file).
    """
    file = Path(path)
    table = read_toml(file)
    actions = _actions(parser)
    words: list[str] = []
    for key, value in table.items():
        dest = key.replace("-", "_")
        if isinstance(value, dict):
            raise ConfigFileError(f"config file {file}: key {key!r} is a table; the file is one flat table of "
                                  f"flags")
        if dest in skip or dest not in actions:
            near = sorted(d.replace("_", "-") for d in actions if d not in skip and (dest in d or d in dest))
            hint = f" (did you mean {', '.join(near[:3])}?)" if near else ""
            raise ConfigFileError(f"config file {file}: unknown key {key!r}{hint}; the keys are the flags of "
                                  f"--help without the leading dashes")
        words += _words(key, value, actions[dest], file)
    return words


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"value must be a bool, number, string or list, got {type(value).__name__}")


def dump_toml(values: Mapping[str, object], *, header: str = "") -> str:
    """A flat TOML document of ``values`` (keys written with dashes, as the flags; ``None`` values are left out,
    which leaves those flags at their defaults). ``header`` becomes ``#`` comment lines at the top."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key.replace('_', '-')} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
