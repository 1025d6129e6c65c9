"""Command-line flags generated from the merge methods' config dataclasses (the registry).

Every field of every registered method's config (LoRA and VeRA) becomes one ``--flag``: its type
and ``Literal`` choices from the annotation, its help from the config's ``Attributes:``
docstring, its default shown from the dataclass. A new method with a new config field gets its
flag without touching the CLI. Flags default to ``None`` ("not given"): the config's own default
applies, and a flag the chosen method's config lacks is refused by :func:`build_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

# The registry's declarations only: no method implementation (and no torch) is imported.
from hydraopt.merge.registry import MethodInfo, list_methods, method_info

# Handled by the CLI itself: ``--heads`` is shown with the methods that take it.
SPECIAL_FIELDS = ("heads",)


@dataclass(frozen=True)
class ConfigFlag:
    """One config field as a command-line flag.

    Attributes:
        field: the config field name (``refine_steps``); the flag is ``--refine-steps``.
        kind: ``int``, ``float``, ``str`` or ``bool``.
        choices: the ``Literal`` values, or None.
        many: a tuple field (``nargs="+"``, converted back to a tuple).
        help: the field's doc with where it applies and its default.
        owner: the config class that documents it (the first in registry order).
    """

    field: str
    kind: type
    choices: tuple[Any, ...] | None
    many: bool
    help: str
    owner: type


def config_classes() -> Iterator[tuple[type, list[str]]]:
    """Every config class of the registry with the methods that use it, in registry order.

    A class only ever used for VeRA adapters names its methods ``<name> on VeRA``.
    """
    users: dict[type, list[str]] = {}
    lora_classes = {method_info(n).config_class for n in list_methods()}
    for name in list_methods():
        method = method_info(name)
        for cls in (method.config_class, method.vera_config_class):
            if cls is not None:
                label = name if cls in lora_classes else f"{name} on VeRA"
                users.setdefault(cls, []).append(label)
    yield from users.items()


def field_docs(cls: type) -> dict[str, str]:
    """``name -> text`` of a Google-style ``Attributes:`` docstring section, one line each."""
    doc = cls.__doc__ or ""
    docs: dict[str, str] = {}
    current = None
    in_section = False
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            in_section = True
            continue
        if not in_section:
            continue
        m = re.match(r"^\s{4,8}(\w+): (.*)$", line)
        if m and (len(line) - len(line.lstrip())) <= 8:
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif line.strip() and current is not None:
            docs[current] += " " + line.strip()
        elif not line.strip() and docs:
            in_section = False
    return {
        k: re.sub(r":\w+:`~?([^`]+)`|``([^`]+)``", lambda m: m[1] or m[2], v)
        for k, v in docs.items()
    }


def _flag_type(annotation: Any) -> tuple[type, tuple[Any, ...] | None, bool]:
    """(scalar type, Literal choices, is a tuple) of a config field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _flag_type(args[0])
    if origin is Literal:
        return type(args[0]), tuple(args), False
    if origin is tuple:
        return _flag_type(args[0])[0], None, True
    return annotation, None, False


def config_flags() -> list[ConfigFlag]:
    """One flag per config field over the registry (first documented occurrence wins)."""
    flags: dict[str, ConfigFlag] = {}
    for cls, _ in config_classes():
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in SPECIAL_FIELDS or f.name in flags:
                continue
            kind, choices, many = _flag_type(hints[f.name])
            flags[f.name] = ConfigFlag(f.name, kind, choices, many, docs.get(f.name, ""), cls)
    return list(flags.values())


def methods_using(field: str) -> list[str]:
    """Registry names of the methods whose config (either kind) has ``field``."""
    out: list[str] = []
    for cls, names in config_classes():
        if field in {f.name for f in dataclasses.fields(cls)}:
            base = {n.split(" ")[0] for n in out}
            out.extend(n for n in names if n.split(" ")[0] not in base)
    return out


def _default(field: str) -> str | None:
    """The field's default when every config that has it agrees on one (else its doc says)."""
    values = {
        str(f.default)
        for cls, _ in config_classes()
        for f in dataclasses.fields(cls)
        if f.name == field
    }
    value = values.pop() if len(values) == 1 else None
    return None if value in (None, "None", str(dataclasses.MISSING)) else value


def _where(names: list[str]) -> str:
    classic = [n for n in list_methods() if not method_info(n).takes_heads]
    if set(classic) <= set(names) and len(classic) > 2:
        rest = [n for n in names if n not in classic]
        return ", ".join(["classic merges", *rest])
    return ", ".join(names)


def add_config_flags(group: argparse._ArgumentGroup) -> list[ConfigFlag]:
    """Add every config flag to ``group``; returns them (for :func:`config_options`)."""
    flags = config_flags()
    for flag in flags:
        default = _default(flag.field)
        notes = [_where(methods_using(flag.field))]
        if default is not None:
            notes.append(f"default {default}")
        text = f"{flag.help} [{'; '.join(notes)}]".strip()
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}
        if flag.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = flag.kind
            if flag.choices is not None:
                kwargs["choices"] = flag.choices
            if flag.many:
                kwargs["nargs"] = "+"
        group.add_argument(f"--{flag.field.replace('_', '-')}", **kwargs)
    return flags


def heads_help() -> str:
    """Help of ``--heads`` from the methods' ``takes_heads``."""
    choose = [n for n in list_methods() if method_info(n).takes_heads]
    return (
        f"M, the number of B heads per module, 1..K (required by {', '.join(choose)}; "
        "the other methods fix M themselves)"
    )


def config_options(args: argparse.Namespace, method: MethodInfo) -> dict[str, Any]:
    """The config fields of ``method`` (any kind) that the user gave; None = not given."""
    fields: list[str] = []
    for cls in (method.config_class, method.vera_config_class):
        if cls is not None:
            fields += [f.name for f in dataclasses.fields(cls) if f.name not in fields]
    given = {name: getattr(args, name, None) for name in fields}
    for name, value in given.items():
        if isinstance(value, list):
            given[name] = tuple(value)
    return given
