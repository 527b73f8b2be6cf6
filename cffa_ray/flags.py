"""Dataclass fields as CLI flags: the one config definition (config.py) becomes argparse flags,
worker dicts and JSON records without a second list of names.

A field made with `flag(default, help, ...)` is the flag `--field_name`, typed from its annotation;
booleans get `--x / --no-x`; the help says the default once.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field, fields
from typing import Any, get_type_hints


def flag(default: Any, help: str, **extra: Any) -> Any:
    """A field that is also a CLI flag. `extra`: aliases, choices, required (shown as such in --help;
    `validate` enforces it), default_text (the default in words, where the value alone says too little),
    parse (argparse type instead of the annotation's)."""
    return field(default=default, metadata={"help": help, **extra})


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One argparse flag per dataclass field, typed from the annotation, help from metadata."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        kind = _base_type(hints[f.name])
        names = [f"--{f.name}", *f.metadata.get("aliases", ())]
        help_text = _help_with_default(f)
        if kind is bool:
            parser.add_argument(*names, action=_BooleanFlag, default=f.default, help=help_text)
            continue
        parser.add_argument(*names, type=f.metadata.get("parse", kind), default=f.default,
                            choices=f.metadata.get("choices"), help=help_text)


def _help_with_default(f: dataclasses.Field) -> str:
    """The help text with the default said once: '(required)', the default's words, or its value."""
    help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
    if f.metadata.get("required"):
        return f"{help_text} (required)"
    default = f.metadata.get("default_text")
    if default is None and f.default is not None:
        default = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
    return help_text if default is None else f"{help_text} (default: {default})"


class _BooleanFlag(argparse.BooleanOptionalAction):
    """--x / --no-x, without the '(default: ...)' that some Pythons append on their own (it is in the help)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        help_text = kwargs.get("help")
        super().__init__(*args, **kwargs)
        self.help = help_text


def _base_type(kind: Any) -> type:
    if kind in (int, float, str, bool):
        return kind
    args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
    return args[0] if args else str


def from_namespace(cls: type, ns: argparse.Namespace, **overrides: Any):
    """The dataclass `cls` from parsed flags (fields absent from `ns` keep their defaults)."""
    values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
    values.update(overrides)
    return cls(**values)


def to_dict(cfg: Any) -> dict:
    """A config as a plain dict: what Ray workers receive and JSON records hold."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, values: dict):
    """The dataclass `cls` from a dict, ignoring keys it does not know (records of other versions)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})
