"""Task names: each one becomes a directory name on export, so each must be one safe path component.

Names come from ``--names``, from adapter directory names and from a bundle's ``bundle.json``,
which is a file people share: a name like ``../x`` or ``/etc/x`` would make export write outside
its output directory. The same rule is applied when a merge takes its names and again when a
bundle is loaded, so a bundle written by hand (or by an older hydraopt) cannot get around it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

from hydraopt.errors import HydraoptError

MAX_NAME_CHARS = 100  # well under NAME_MAX (255 bytes) even in 2-byte UTF-8, with room for suffixes
SEPARATORS = frozenset("/\\")  # POSIX and Windows path separators


def task_name_problem(name: Any) -> str | None:
    """Why ``name`` is not a safe task name, or None when it is.

    A safe name is a non-empty string of at most :data:`MAX_NAME_CHARS` printable characters,
    with no path separator (``/`` or ``\\``), not starting with ``.`` (``.``, ``..``,
    hidden files and hydraopt's own temp dirs) and without leading or trailing whitespace.
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long (at most {MAX_NAME_CHARS})"
    if name.startswith("."):
        return "starts with '.' (names become directories; '.', '..' and hidden names are refused)"
    if name != name.strip():
        return "has leading or trailing whitespace"
    bad = sorted({c for c in name if c in SEPARATORS})
    if bad:
        return f"contains {''.join(bad)!r} (names become directories: no path separators)"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return "contains control characters"
    return None


def check_task_names(names: Sequence[Any], where: str = "task names") -> list[str]:
    """Refuse any unsafe or repeated name (see :func:`task_name_problem`); returns the names.

    Args:
        names: the task names, in task order.
        where: what the names came from, for the message (e.g. a bundle.json path).
    """
    for name in names:
        problem = task_name_problem(name)
        if problem is not None:
            raise HydraoptError(f"{where}: task name {name!r} {problem}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise HydraoptError(f"{where}: task name {name!r} appears twice; names must be unique")
        seen.add(name)
    return list(names)


def select_tasks(tasks: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """The tasks to export: ``wanted`` (each one of ``tasks``, no repeats), or all of ``tasks``.

    Every name of ``tasks`` is checked too: an in-memory bundle never went through the loader.
    """
    check_task_names(list(tasks), "bundle")
    if not wanted:
        return list(tasks)
    unknown = [t for t in wanted if t not in tasks]
    if unknown:
        raise HydraoptError(f"task {unknown[0]!r} is not in the bundle (tasks: {list(tasks)})")
    return check_task_names(list(wanted), "tasks to export")
