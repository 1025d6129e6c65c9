"""docs/adding-a-method.md, followed to the letter by a method that exists only in this test.

A new method is a config, a class, its registration and its declaration (here all in this file):
the CLI then offers it as ``--method`` and generates a flag per config field (type, ``Literal``
choices, help from the docstring) from the declaration alone, merges with it, writes and exports
its bundle (recording the fields that applied) and includes it in ``hydraopt sweep`` — no other
file changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
import torch

from hydraopt.cli.main import build_parser, main
from hydraopt.engine import resolve_config
from hydraopt.errors import HydraoptError
from hydraopt.io.bundle import load_bundle
from hydraopt.io.peft import load_adapter_set
from hydraopt.merge import registry
from hydraopt.merge.base import MergeContext, method_heads, select_fields
from hydraopt.types import LoraStack, MergedStack

NAME = "shared_center"


@dataclass(frozen=True)
class SharedCenterConfig:
    """Options of the test-only shared-center merge.

    Attributes:
        center: how the tasks' A's are combined into A': ``mean`` or ``median`` (elementwise).
        shrink: factor applied to A' (1 keeps it as is).
        heads: accepted only to refuse a wrong M; the method stores K heads.
    """

    center: Literal["mean", "median"] = "mean"
    shrink: float = 1.0
    heads: int | None = None

    def __post_init__(self) -> None:
        if not self.shrink > 0:
            raise HydraoptError(f"shrink must be > 0, got {self.shrink}")


class SharedCenter:
    """A' = the elementwise center of the tasks' A's; every task keeps its own scaled B."""

    config_class: ClassVar[type] = SharedCenterConfig
    space: ClassVar[str] = "factors"
    vera_config_class: ClassVar[type | None] = None
    takes_heads: ClassVar[bool] = False
    name = NAME

    def num_heads(self, config: SharedCenterConfig, num_tasks: int) -> int:
        return num_tasks

    def label(self, num_heads: int) -> str:
        return self.name

    def applied_config(
        self, config: SharedCenterConfig, num_tasks: int, device: str = "cpu"
    ) -> dict:
        return select_fields(config, {"center", "shrink"})  # heads only checks M

    def merge(
        self,
        stack: LoraStack,
        config: SharedCenterConfig,
        *,
        generator: torch.Generator,
        context: MergeContext,
    ) -> MergedStack:
        G, K = stack.A.shape[:2]
        method_heads(self, config, K)
        a = stack.A.mean(1) if config.center == "mean" else stack.A.median(1).values  # (G, r, k)
        routing = torch.arange(K).expand(G, K).clone()  # (G, K): task i -> head i
        return MergedStack(a * config.shrink, stack.scaled_B, routing)


@pytest.fixture
def declared_method(monkeypatch):
    """Step 5 of the doc, undone after the test: the declaration. Its module does not exist, so
    anything that tried to import the implementation would fail."""
    monkeypatch.setattr(registry, "_DECLARED", dict(registry._DECLARED))
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.declare(NAME, "tests_no_such_module", SharedCenterConfig, takes_heads=False)
    return NAME


@pytest.fixture
def registered_method(declared_method):
    """Step 4 as well: the registration (``register(name, instance)``, as an import would)."""
    registry.register(NAME, SharedCenter())
    return NAME


@pytest.fixture
def adapters(make_adapter, tmp_path):
    return [str(make_adapter(f"task{i}", seed=i + 1, parent=tmp_path / "in")) for i in range(3)]


def subcommand_help(name: str) -> str:
    parser = build_parser(name)  # the lazy CLI registers only the named subcommand
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name].format_help()  # type: ignore[attr-defined]


def test_the_cli_offers_the_method_and_one_flag_per_config_field(declared_method):
    text = " ".join(subcommand_help("merge").split())
    assert NAME in text
    assert "--center {mean,median}" in text
    assert "how the tasks' A's are combined into A': mean or median (elementwise)." in text
    assert f"[{NAME}; default mean]" in text
    assert "--shrink SHRINK" in text and "factor applied to A'" in text
    assert NAME in " ".join(subcommand_help("sweep").split())  # a default baseline


def test_the_method_merges_through_the_cli_into_a_bundle(registered_method, adapters, tmp_path):
    out = tmp_path / "b"
    argv = ["merge", *adapters, "--method", NAME, "--center", "median", "--shrink", "0.5"]
    assert main([*argv, "--dtype", "float32", "--out", str(out)]) == 0
    bundle = load_bundle(out)
    assert bundle.method == NAME and bundle.config == {"center": "median", "shrink": 0.5}
    aset = load_adapter_set(adapters)
    for spec in aset.modules:
        stack = aset.load_stack([spec])
        m = bundle.merged[spec.name]
        a, heads, routing = m.A, m.heads, m.routing
        want_a = 0.5 * stack.A[0].median(0).values  # independent: torch's own median over K
        assert torch.equal(a, want_a)
        assert torch.equal(heads, stack.scaled_B[0]) and routing.tolist() == [0, 1, 2]
    assert bundle.storage.bundle_params == sum(3 * m.d * m.r + m.r * m.k for m in aset.modules)
    assert main(["export", str(out), "--out", str(tmp_path / "peft")]) == 0
    meta = json.loads((tmp_path / "peft" / "task1" / "hydraopt_export.json").read_text())
    assert meta["method"] == NAME


def test_config_checks_and_m_checks_come_from_the_library(
    registered_method, adapters, tmp_path, capsys
):
    out = tmp_path / "never"
    assert main(["merge", *adapters, "--method", NAME, "--shrink", "0", "--out", str(out)]) == 2
    assert "shrink must be > 0" in capsys.readouterr().err
    assert main(["merge", *adapters, "--method", NAME, "--heads", "2", "--out", str(out)]) == 2
    assert f"{NAME} stores 3 head(s)" in capsys.readouterr().err
    ok = tmp_path / "ok"
    assert main(["merge", *adapters, "--method", NAME, "--solver", "paper", "--out", str(ok)]) == 0
    assert not out.exists() and load_bundle(ok).config["center"] == "mean"  # --solver: ignored


def test_a_method_without_a_vera_config_refuses_vera_adapters(registered_method):
    # resolve_config is merge_adapter_set's first step, with the adapter set's kind.
    with pytest.raises(HydraoptError, match=f"{NAME}' does not merge VERA adapters"):
        resolve_config(NAME, {}, 2, "vera")
    assert resolve_config(NAME, {}, 2, "lora") == SharedCenterConfig()


def test_the_sweep_runs_it_under_its_label(registered_method, adapters, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", *adapters, "--heads", "1", "--baselines", NAME, "--out", str(out)]) == 0
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["label"] for p in points] == ["hydraopt M=1", NAME]
    assert points[1]["heads"] == 3


def test_a_registration_must_match_its_declaration(declared_method):
    class Other(SharedCenter):
        takes_heads = True

    with pytest.raises(ValueError, match="takes_heads is True but declared as False"):
        registry.register(NAME, Other())
