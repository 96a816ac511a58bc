"""A dataclass's command line, generated from its fields.

A field declared with `setting` carries its help text, allowed values and command-line form;
`add_config_arguments` turns every such field into an option, and `namespace_values` reads the
parsed options back as the dataclass's keyword arguments. `TrainingConfig` (lib/training/config.py)
is the dataclass; `train_distributed.py` is the command line.

Generic and light: this module imports nothing of `lib` and no torch, so a command line parses
and checks its arguments before the heavy imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path

# Parsers of command-line text (a field's `parse`): ValueError when the text is malformed.

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """'3h30m', '90m', '45s' or plain seconds -> seconds."""
    m = _DURATION.match(text.strip())
    if not text.strip() or not m or not any(m.groups()):
        raise ValueError(f"bad duration {text!r}; use e.g. 3h30m, 90m, 600s or 600")
    h, mnt, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mnt * 60 + s


def parse_count(text: str) -> int:
    """'2.5M', '10B', '300k' or a plain number -> an integer."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMbB]?)", text.strip())
    if not m:
        raise ValueError(f"bad count {text!r}; use e.g. 300k, 2.5M, 10B or 5000000")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()])


def parse_optional_path(text: str) -> Path | None:
    """A path, or 'none' (the feature is off)."""
    return None if text.strip().lower() == "none" else Path(text)


def setting(
    default=dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    parse: Callable[[str], object] | None = None,
    metavar: str | None = None,
    aliases: dict[str, tuple[object, str]] | None = None,
    cli: bool = True,
    default_factory=dataclasses.MISSING,
):
    """A dataclass field with its help text, allowed values and command-line form.

    flag: the option's name (default `--field-name`); parse: text -> value for the command line
    (default: the field's type); aliases: extra flags that set a fixed value (`--bf16` for
    precision bf16), mutually exclusive with the flag; cli=False: not on the command line."""
    metadata = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "parse": parse,
        "metavar": metavar,
        "aliases": aliases or {},
        "cli": cli,
    }
    return field(default=default, default_factory=default_factory, metadata=metadata)


def cli_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _value_type(hint) -> tuple[type, int | str | None]:
    """(element type, nargs) of a field's annotation: `int | None` -> (int, None); a
    `tuple[str, ...]` is a repeatable option (nargs "append")."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0], "append" if args[-1] is Ellipsis else len(args)
    return (args[0] if len(args) == 1 else hint), None


def _command_line_parser(parse: Callable[[str], object]) -> Callable[[str], object]:
    """`parse` for argparse: its ValueError message becomes the command-line error."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """One option per field of the dataclass `cls` (help, choices, flag name and parser from the
    metadata). Booleans get --name/--no-name; the parsed namespace feeds `namespace_values`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get("cli", True):
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        value_type, nargs = _value_type(hints[f.name])
        help_text = m.get("help", "").replace("%", "%%")
        kw: dict = {"dest": f.name, "default": default}
        if value_type is bool:
            kw["action"] = argparse.BooleanOptionalAction
            help_text += f" (default: {'on' if default else 'off'})"
        else:
            parse = m.get("parse")
            kw["type"] = _command_line_parser(parse) if parse else value_type
            if nargs == "append":
                kw["action"], kw["default"] = "append", None  # None: the default (namespace_values)
            elif nargs:
                kw["nargs"] = nargs
            if m.get("choices"):
                kw["choices"] = m["choices"]
            if m.get("metavar"):
                kw["metavar"] = m["metavar"]
            if default is not None:
                help_text += " (default: %(default)s)"
        kw["help"] = help_text
        target = parser
        if m.get("aliases"):
            target = parser.add_mutually_exclusive_group()
        target.add_argument(cli_flag(f), **kw)
        for alias, (value, alias_help) in m.get("aliases", {}).items():
            target.add_argument(
                alias, dest=f.name, action="store_const", const=value, help=alias_help
            )
    return parser


def namespace_values(cls: type, args: argparse.Namespace) -> dict:
    """The keyword arguments of `cls` that a parser made by `add_config_arguments` read."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is None and f.default == ():  # a repeatable option never given
                continue
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return values
