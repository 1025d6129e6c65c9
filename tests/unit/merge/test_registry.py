"""The one registry: declared names are known torch-free, implementations load on first use."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import pytest

from hydraopt.errors import HydraoptError
from hydraopt.merge import registry
from hydraopt.merge.classic_config import A_ONLY_METHODS, CLASSIC_METHODS


@dataclass(frozen=True)
class LateConfig:
    """Options of a method whose module is imported only when it is used.

    Attributes:
        heads: accepted only to refuse a wrong M.
    """

    heads: int | None = None


@pytest.fixture
def clean_registry(monkeypatch):
    """The built-in registry, with whatever the test adds undone afterwards."""
    monkeypatch.setattr(registry, "_DECLARED", dict(registry._DECLARED))
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


def write_module(tmp_path, monkeypatch, name: str, takes_heads: bool = False) -> None:
    """A method module on sys.path, registered with ``@registered`` when imported."""
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            from tests_late_config import LateConfig
            from hydraopt.merge.registry import registered

            @registered("late")
            class Late:
                config_class = LateConfig
                vera_config_class = None
                space = "factors"
                takes_heads = {takes_heads}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tests_late_config", sys.modules[__name__])
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_built_in_order_is_full_classic_then_a_only_then_hydraopt():
    assert registry.list_methods()[:11] == [*CLASSIC_METHODS, *A_ONLY_METHODS, "hydraopt"]
    assert registry.method_info("hydraopt").takes_heads
    assert registry.method_info("ties").module == "hydraopt.merge.classic"


def test_a_declared_method_is_imported_on_first_use(clean_registry, tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "late_method")
    registry.declare("late", "late_method", LateConfig, takes_heads=False)
    assert "late" in registry.list_methods()
    assert registry.method_info("late").config_class is LateConfig
    assert "late_method" not in sys.modules  # known, flags and all, without importing it
    method = registry.get_method("late")
    assert "late_method" in sys.modules and method.name == "late"
    assert registry.get_method("late") is method


def test_a_registration_that_contradicts_its_declaration_is_refused(
    clean_registry, tmp_path, monkeypatch
):
    write_module(tmp_path, monkeypatch, "late_wrong", takes_heads=True)
    registry.declare("late", "late_wrong", LateConfig, takes_heads=False)
    with pytest.raises(ValueError, match="takes_heads is True but declared as False"):
        registry.get_method("late")


def test_a_declared_module_must_register_the_name(clean_registry):
    registry.declare("ghost", "hydraopt.merge.choices", LateConfig, takes_heads=False)
    with pytest.raises(ValueError, match="registered no method 'ghost'"):
        registry.get_method("ghost")
    with pytest.raises(ValueError, match="declared twice"):
        registry.declare("ghost", "hydraopt.merge.choices", LateConfig, takes_heads=False)


def test_a_method_registered_without_declaration_is_listed(clean_registry):
    class Plain:
        config_class = LateConfig
        vera_config_class = None
        takes_heads = False

    registry.register("plain", Plain())  # type: ignore[arg-type]
    assert registry.list_methods()[-1] == "plain"
    assert registry.method_info("plain").config_class is LateConfig
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("plain", Plain())  # type: ignore[arg-type]


def test_unknown_names_are_user_errors():
    with pytest.raises(HydraoptError, match="unknown method 'nope'"):
        registry.get_method("nope")
    with pytest.raises(HydraoptError, match="unknown method 'nope'"):
        registry.method_info("nope")
