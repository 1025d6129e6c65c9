"""Bundles record only the config fields that applied (``applied_config``), and that record is
faithful: every field left out can change without changing a bit of the result, and the config
rebuilt from the record merges the same tensors."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch
from helpers import random_stack

from hydraopt.cli.main import main
from hydraopt.devices import resolve_precision
from hydraopt.engine import resolve_config
from hydraopt.io.bundle import META_NAME, load_bundle
from hydraopt.kinds.registry import get_kind
from hydraopt.kinds.vera.config import VeraHydraOptConfig
from hydraopt.kinds.vera.kind import VERA
from hydraopt.merge.base import MergeContext, applied_config, build_config, config_to_dict
from hydraopt.merge.hydraopt import HydraOptConfig
from hydraopt.merge.registry import get_method, list_methods
from hydraopt.types import VeraStack

K = 3
CTX = MergeContext(num_tasks=K, num_factor_tensors=8)
# A valid value different from the default, per field (any config that has it).
OTHER: dict[str, Any] = {
    "weights": (0.3, -0.2, 0.9),
    "density": 0.3,
    "majority_sign_method": "frequency",
    "distance": "fro",
    "solver": "paper",
    "epochs": 3,
    "lr": 0.5,
    "weight_decay": 0.1,
    "temperature": 1.0,
    "restarts": 2,
    "refine_steps": 7,
    "refine_lr": 0.3,
    "refine_precision": "float32",
    "refine_tasks": 2,
    "start": "closed_form",
    "shared": "lambda_b",
    "cp_sweeps": 5,
}


def vera_stack(G: int = 2, d: int = 6, r: int = 3, k: int = 5) -> VeraStack:
    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen)
    return VeraStack(torch.randn(G, K, d, generator=gen), torch.randn(G, K, r, generator=gen), A, B)


def merge(name: str, config: Any, kind: str) -> list[torch.Tensor]:
    """The merged tensors of ``name`` with ``config`` on fixed random stacks of ``kind``."""
    method = get_method(name)
    gen = torch.Generator().manual_seed(0)
    if kind == "vera":
        out = method.merge_vera(vera_stack(), config, generator=gen, context=CTX)
        return [out.lambda_b, out.lambda_d, out.routing]
    lora = method.merge(random_stack(K=K, seed=5), config, generator=gen, context=CTX)
    return [lora.A, lora.heads, lora.routing]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


CLASSIC = [name for name in list_methods() if name not in ("hydraopt", "shared_basis")]
CASES = [(name, {}, "lora") for name in CLASSIC] + [
    ("hydraopt", {"heads": 1}, "lora"),
    ("hydraopt", {"heads": 2}, "lora"),
    ("hydraopt", {"heads": 3}, "lora"),
    ("hydraopt", {"heads": 2, "distance": "mse"}, "lora"),
    ("hydraopt", {"heads": 2, "refine_steps": 0}, "lora"),
    ("hydraopt", {"heads": 2, "refine_tasks": 2, "refine_steps": 5}, "lora"),
    ("hydraopt", {"heads": 2, "solver": "paper", "epochs": 20}, "lora"),
    ("shared_basis", {"rank": 2}, "lora"),
    ("shared_basis", {"rank": 2, "core": "diagonal", "cp_sweeps": 3}, "lora"),
    ("shared_basis", {"rank": 2, "refine_steps": 3}, "lora"),
    ("ties", {}, "vera"),
    ("task_arithmetic_a_only", {}, "vera"),
    ("hydraopt", {"heads": 1, "refine_steps": 5}, "vera"),
    ("hydraopt", {"heads": 3, "refine_steps": 5}, "vera"),
    ("hydraopt", {"heads": 2, "refine_steps": 5}, "vera"),
    ("hydraopt", {"heads": 2, "distance": "mse"}, "vera"),
    ("hydraopt", {"heads": 2, "refine_steps": 0}, "vera"),
]


@pytest.mark.parametrize(("name", "options", "kind"), CASES)
def test_fields_left_out_do_not_change_the_result(name: str, options: dict, kind: str) -> None:
    config = resolve_config(name, options, K, kind)
    want = merge(name, config, kind)
    recorded = get_kind(kind).applied_config(get_method(name), config, K, "cpu")
    assert same(merge(name, build_config(type(config), recorded), kind), want)
    for field in [f.name for f in dataclasses.fields(config) if f.name not in recorded]:
        if field in ("heads", "budget"):  # heads: only checked against the M the method fixes
            continue  # itself; budget: shared_basis takes a rank or a budget, never both
        changed = dataclasses.replace(config, **{field: OTHER[field]})
        assert same(merge(name, changed, kind), want), field


def test_a_recorded_field_can_matter() -> None:
    # The check above must be able to fail: the refinement's steps change the result.
    config = HydraOptConfig(heads=2)
    assert "refine_steps" in applied_config(get_method("hydraopt"), config, K)
    other = dataclasses.replace(config, refine_steps=OTHER["refine_steps"])
    assert not same(merge("hydraopt", config, "lora"), merge("hydraopt", other, "lora"))


def test_what_each_method_records() -> None:
    hydra = get_method("hydraopt")
    for precision, steps in (("bfloat16", 100), ("float32", 40)):
        config = HydraOptConfig(heads=2, refine_precision=precision)
        assert applied_config(hydra, config, K) == {
            "heads": 2,
            "distance": "mae",
            "solver": "fast",
            "restarts": 8,
            "refine_steps": steps,  # the default schedule for M < K on that path, worked out
            "refine_lr": 1.0,
            "refine_precision": precision,
            "refine_tasks": 8,
            "start": "auto",
            "head_scale": 1.0,
        }
    # "auto" is recorded as the path this machine's CPU takes.
    auto = applied_config(hydra, HydraOptConfig(heads=2), K)
    assert auto["refine_precision"] == resolve_precision("auto", torch.device("cpu"))
    assert applied_config(hydra, HydraOptConfig(heads=3, distance="mse"), K) == {
        "heads": 3,
        "distance": "mse",
        "solver": "fast",
        "head_scale": 1.0,
    }
    own = HydraOptConfig(heads=3, refine_precision="bfloat16")
    assert applied_config(hydra, own, K)["refine_steps"] == 20  # M = K
    assert applied_config(hydra, HydraOptConfig(heads=1, solver="paper"), K) == {
        "heads": 1,
        "distance": "mae",
        "solver": "paper",
        "epochs": 1000,
        "lr": 0.01,
        "weight_decay": 0.01,
        "temperature": 0.2,
        "head_scale": 1.0,
    }
    assert VERA.applied_config(hydra, VeraHydraOptConfig(heads=2), K, "cpu") == {
        "heads": 2,
        "distance": "mae",
        "shared": "lambda_d",
        "restarts": 8,
        "refine_steps": 100,
        "refine_lr": 0.05,
    }
    config = build_config(get_method("ties").config_class, {})
    assert applied_config(get_method("task_arithmetic"), config, 4) == {"weights": [0.25] * 4}
    assert applied_config(get_method("ties"), config, K) == {
        "weights": [1.0, 1.0, 1.0],
        "density": 0.5,
        "majority_sign_method": "total",
    }
    assert applied_config(get_method("dare_linear_a_only"), config, 2) == {
        "weights": [0.5, 0.5],
        "density": 0.5,
    }


def test_a_method_without_applied_config_records_every_field() -> None:
    class Plain:
        pass

    config = HydraOptConfig(heads=2)
    assert applied_config(Plain(), config, K) == config_to_dict(config)  # type: ignore[arg-type]


@pytest.fixture
def adapters(make_adapter, tmp_path):
    return [str(make_adapter(f"task{i}", seed=i + 1, parent=tmp_path / "in")) for i in range(K)]


def test_bundles_and_sweeps_record_what_applied(adapters, tmp_path, capsys) -> None:
    out = tmp_path / "b"
    assert main(["merge", *adapters, "--heads", "2", "--refine-steps", "3", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "config: heads=2, distance=mae, solver=fast, restarts=8, refine_steps=3," in shown
    config = json.loads((out / META_NAME).read_text())["config"]
    assert config["refine_steps"] == 3 and config["refine_lr"] == 1.0
    assert not {"epochs", "lr", "weight_decay", "temperature"} & set(config)
    sweep = tmp_path / "s"
    argv = ["sweep", *adapters, "--heads", "3", "--baselines", "task_arithmetic", "--out"]
    assert main([*argv, str(sweep), "--distance", "mse"]) == 0
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    assert [p["config"] for p in points] == [
        {"heads": 3, "distance": "mse", "solver": "fast", "head_scale": 1.0},
        {"weights": [1 / 3] * 3},
    ]


def test_a_bundle_that_recorded_every_field_still_loads_and_inspects(adapters, tmp_path):
    # Bundles written before applied_config recorded every field of the config, used or not.
    out = tmp_path / "old"
    assert main(["merge", *adapters, "--heads", "2", "--refine-steps", "3", "--out", str(out)]) == 0
    meta = json.loads((out / META_NAME).read_text())
    meta["config"] = config_to_dict(HydraOptConfig(heads=2, refine_steps=3))
    (out / META_NAME).write_text(json.dumps(meta, indent=2))
    assert load_bundle(out).config["epochs"] == 1000
    report = tmp_path / "i.json"
    assert main(["inspect", str(out), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["bundle"]["config"]["temperature"] == 0.2
    assert main(["export", str(out), "--out", str(tmp_path / "peft")]) == 0
