"""Task names are one safe path component: checked at merge, on bundle load and on export."""

from __future__ import annotations

import pytest

from hydraopt.errors import HydraoptError
from hydraopt.io.names import MAX_NAME_CHARS, check_task_names, select_tasks, task_name_problem


@pytest.mark.parametrize("name", ["en-gc", "task_1", "tâche", "a b", "x" * MAX_NAME_CHARS, "v1.2"])
def test_ordinary_names_pass(name):
    assert task_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../escaped", "starts with '.'"),
        ("..", "starts with '.'"),
        (".", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("/etc/x", "path separators"),
        ("a/b", "path separators"),
        ("a\\b", "path separators"),
        ("", "empty"),
        ("a\nb", "control characters"),
        ("a\x00b", "control characters"),
        ("a\u202eb", "control characters"),  # right-to-left override: hides the real name
        (" a", "whitespace"),
        ("a ", "whitespace"),
        ("x" * (MAX_NAME_CHARS + 1), "characters long"),
        (3, "not a string"),
        (None, "not a string"),
    ],
)
def test_unsafe_names_are_refused_with_the_reason(name, why):
    assert why in task_name_problem(name)
    with pytest.raises(HydraoptError, match="task name") as e:
        check_task_names(["ok", name], "somewhere")
    assert str(e.value).startswith("somewhere: ") and "\n" not in str(e.value)


def test_repeated_names_are_refused():
    with pytest.raises(HydraoptError, match="'a' appears twice"):
        check_task_names(["a", "b", "a"])


def test_select_tasks_keeps_order_and_refuses_unknown_or_unsafe_names():
    assert select_tasks(("a", "b", "c"), None) == ["a", "b", "c"]
    assert select_tasks(("a", "b", "c"), ["c", "a"]) == ["c", "a"]
    with pytest.raises(HydraoptError, match="not in the bundle"):
        select_tasks(("a", "b"), ["../a"])
    with pytest.raises(HydraoptError, match="twice"):
        select_tasks(("a", "b"), ["a", "a"])
    with pytest.raises(HydraoptError, match="path separators"):
        select_tasks(("a", "/abs"), None)  # an in-memory bundle never went through the loader
