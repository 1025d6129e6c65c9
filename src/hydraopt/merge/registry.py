"""The single registry of merge methods: registry name = CLI name = bundle metadata name.

A method is known to the registry in two steps, so that the CLI can list methods and build their
flags without importing torch (``hydraopt merge --help`` in a fraction of a second):

1. :func:`declare` (in :mod:`hydraopt.merge`, torch-free): the name, the module that implements
   it, its config classes and whether it takes M. This is all :func:`method_info` reads.
2. :func:`registered` / :func:`register` (in that module, on import): the method object itself.
   :func:`get_method` imports the declared module on first use; the registry checks that the
   object agrees with its declaration.

A method registered without a declaration (a test, a plugin imported by hand) is known from its
registration on.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydraopt.errors import HydraoptError

if TYPE_CHECKING:
    from hydraopt.merge.base import MergeMethod


@dataclass(frozen=True)
class MethodInfo:
    """What the CLI, the docs and a sweep plan need of a method, without importing it.

    Attributes:
        name: the registry name.
        module: the module whose import registers the method.
        config_class: its config for LoRA adapters (a torch-free dataclass).
        vera_config_class: its config for VeRA adapters, or None (VeRA refused).
        takes_heads: the user chooses M (``heads``); False: the method fixes M itself.
    """

    name: str
    module: str
    config_class: type
    vera_config_class: type | None
    takes_heads: bool


_DECLARED: dict[str, MethodInfo] = {}
_METHODS: dict[str, MergeMethod] = {}


def declare(
    name: str,
    module: str,
    config_class: type,
    *,
    vera_config_class: type | None = None,
    takes_heads: bool,
) -> None:
    """Make ``name`` known before its ``module`` is imported (see module doc); names are unique."""
    if name in _DECLARED:
        raise ValueError(f"merge method {name!r} declared twice")
    _DECLARED[name] = MethodInfo(name, module, config_class, vera_config_class, takes_heads)


def _info_of(name: str, method: MergeMethod) -> MethodInfo:
    return MethodInfo(
        name,
        type(method).__module__,
        method.config_class,
        method.vera_config_class,
        method.takes_heads,
    )


def register(name: str, method: MergeMethod) -> MergeMethod:
    """Add ``method`` under ``name``; names are unique, and a declared one must match.

    Raises:
        ValueError: for a second registration, or a method whose config classes or
            ``takes_heads`` differ from its declaration (the CLI was built from the latter).
    """
    if name in _METHODS:
        raise ValueError(f"merge method {name!r} registered twice")
    declared = _DECLARED.get(name)
    if declared is not None:
        actual = _info_of(name, method)
        for field in ("config_class", "vera_config_class", "takes_heads"):
            if getattr(actual, field) != getattr(declared, field):
                raise ValueError(
                    f"merge method {name!r}: {field} is {getattr(actual, field)!r} but declared "
                    f"as {getattr(declared, field)!r} in hydraopt.merge"
                )
    _METHODS[name] = method
    return method


def registered(name: str) -> Callable[[type], type]:
    """Class decorator: instantiate the class and register it under ``name``."""

    def wrap(cls: type) -> type:
        setattr(cls, "name", name)  # noqa: B010 - classes built by the decorator have no slot
        register(name, cls())
        return cls

    return wrap


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``, importing its declared module on first use."""
    if name not in _METHODS and name in _DECLARED:
        module = _DECLARED[name].module
        importlib.import_module(module)  # its @registered / register() adds the method
        if name not in _METHODS:
            raise ValueError(f"{module} was imported but registered no method {name!r}")
    try:
        return _METHODS[name]
    except KeyError:
        raise HydraoptError(f"unknown method {name!r}; choose one of {list_methods()}") from None


def method_info(name: str) -> MethodInfo:
    """Config classes and ``takes_heads`` of ``name`` without importing its implementation."""
    if name in _DECLARED:
        return _DECLARED[name]
    if name in _METHODS:
        return _info_of(name, _METHODS[name])
    raise HydraoptError(f"unknown method {name!r}; choose one of {list_methods()}")


def list_methods() -> list[str]:
    """Every name: the declared ones in declaration order, then any registered only."""
    return [*_DECLARED, *(n for n in _METHODS if n not in _DECLARED)]
