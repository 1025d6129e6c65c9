"""The single registry of merge methods: registry name = CLI name = bundle metadata name."""

from __future__ import annotations

from collections.abc import Callable

from hydraopt.errors import HydraoptError
from hydraopt.merge.base import MergeMethod

_METHODS: dict[str, MergeMethod] = {}


def register(name: str, method: MergeMethod) -> MergeMethod:
    """Add ``method`` under ``name``; names are unique."""
    if name in _METHODS:
        raise ValueError(f"merge method {name!r} registered twice")
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
    """The method registered as ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise HydraoptError(f"unknown method {name!r}; choose one of {list_methods()}") from None


def list_methods() -> list[str]:
    """Every registered name, in registration order."""
    return list(_METHODS)
