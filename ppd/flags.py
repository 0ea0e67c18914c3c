"""argparse flags generated from frozen dataclasses, so options are declared once (the dataclass) not twice.

    add_dataclass_flags(parser, SweepOptions)          # --repetitions, --max-new-tokens, ...
    opts = dataclass_from_args(SweepOptions, args)
Scalar fields (int, float, str, bool) and tuples of scalars (comma-separated) become flags; the field's comment-free
`metadata["help"]` is the help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_tuple) for int/float/str/bool, X | None and tuple[X, ...]."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is tuple:
        return args[0], True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _base_type(args[0])
    return tp, False


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_tuple = _base_type(hints[f.name])
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
        )
        help_text = f.metadata.get("help", "")
        if tp is bool and not is_tuple:
            parser.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif is_tuple:
            shown = ",".join(str(x) for x in default) if default else ""
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                type=lambda s, t=tp: tuple(t(x) for x in s.split(",") if x != ""),
                default=default,
                help=f"{help_text} (comma-separated; default {shown})",
            )
        else:
            parser.add_argument(
                _flag(f.name), dest=f.name, type=tp, default=default, help=f"{help_text} (default {default})"
            )


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(args).items() if k in names})
