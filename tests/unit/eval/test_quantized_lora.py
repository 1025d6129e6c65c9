"""The separate LoRA adapters quantized at 8/4 bits as an evaluation system (issue 19), checked
against a quantizer written here by hand, PEFT loading the dequantized weights from a dir, and
the bytes of a safetensors file written to disk."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hydraopt import load_adapter_set
from hydraopt.cli.evaluate import parse_system
from hydraopt.errors import HydraoptError
from hydraopt.eval.quantized_lora import QuantizedLora
from hydraopt.eval.systems import PerTaskLora
from hydraopt.quantized_bundle import separate_point

TASKS = ("t0", "t1")


@pytest.fixture
def root(make_adapter, tmp_path) -> Path:
    parent = tmp_path / "adapters"
    for i, task in enumerate(TASKS):
        make_adapter(task, seed=i + 3, alpha=12, parent=parent)
    return parent


def hand_quantize(x: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Symmetric per-group quantization, dequantized, written from the definition: per group
    of ``group_size`` flattened values the step is max|x| / (2^(bits-1) - 0.5) rounded up to a
    float16, each value rounded to the nearest step in [-2^(bits-1), 2^(bits-1) - 1]."""
    flat = x.astype(np.float32).reshape(-1)
    out = np.empty_like(flat)
    half_range = (2**bits - 1) / 2
    for start in range(0, flat.size, group_size):
        group = flat[start : start + group_size]
        step = np.float32(np.abs(group).max() / half_range)
        scale = np.float16(step)
        if np.float32(scale) < step:
            scale = np.nextafter(scale, np.float16(np.inf))
        scale = np.float32(scale) if step > 0 else np.float32(1.0)
        codes = np.clip(np.round(group / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        out[start : start + group_size] = codes * scale
    return out.reshape(x.shape)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 16), (8, 64)])
def test_applied_weights_equal_a_hand_quantization_and_peft_from_disk(
    root, tiny_base, tmp_path, bits, group_size
) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from hydraopt.eval.generate import applied_adapter
    from hydraopt.kinds.lora.apply import lora_layers, lora_weights

    system = QuantizedLora(root, TASKS, bits, group_size)
    system.check_tasks(TASKS)
    task = "t1"
    original = load_file(str(root / task / "adapter_model.safetensors"))
    # The dequantized adapter written as an ordinary PEFT dir: PEFT's own loading is the check.
    by_hand = {
        k: torch.from_numpy(hand_quantize(v.numpy(), bits, group_size)) for k, v in original.items()
    }
    hand_dir = tmp_path / "hand"
    hand_dir.mkdir()
    (hand_dir / "adapter_config.json").write_text((root / task / "adapter_config.json").read_text())
    save_file(by_hand, str(hand_dir / "adapter_model.safetensors"))

    base = LlamaForCausalLM.from_pretrained(tiny_base).eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with applied_adapter(base, system.adapter(task)) as model:
        layers = lora_layers(model)
        assert len(layers) == 8
        for name, layer in layers.items():
            a, b = lora_weights(layer)
            key = f"base_model.model.{name}.lora_%s.weight"
            assert torch.equal(a, by_hand[key % "A"]) and torch.equal(b, by_hand[key % "B"])
            assert not torch.equal(a, original[key % "A"])  # quantization did something
            assert layer.scaling["default"] == pytest.approx(12 / 4)
        with torch.no_grad():
            ours = model(ids).logits
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), hand_dir)
    with torch.no_grad():
        theirs = peft_model.eval()(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 16), (4, 64), (8, 48)])
def test_bytes_are_those_of_a_file_written_to_disk(root, tmp_path, bits, group_size) -> None:
    system = QuantizedLora(root, TASKS, bits, group_size)
    stored, reference = {}, {}
    for task in TASKS:
        for name, (a, b, _) in system.quantized(task).factors.items():
            for part, q in (("A", a), ("B", b)):
                stored[f"{task}.{name}.{part}#codes"] = q.codes
                stored[f"{task}.{name}.{part}#scales"] = q.scales
        for key, t in load_file(str(root / task / "adapter_model.safetensors")).items():
            reference[f"{task}.{key}"] = t.to(torch.float16)
    assert system.nbytes == _data_bytes(stored, tmp_path / "q.safetensors")
    assert system.reference_nbytes == _data_bytes(reference, tmp_path / "r.safetensors")
    assert system.storage_percent == 100.0 * system.nbytes / system.reference_nbytes
    # The sweep's separate point counts the same bytes.
    aset = load_adapter_set([root / t for t in TASKS], list(TASKS))
    assert separate_point(aset, bits, group_size).nbytes == system.nbytes
    assert system.describe()["bytes"] == system.nbytes


def _data_bytes(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """A safetensors file's size less its 8-byte length prefix and JSON header."""
    save_file(tensors, str(path))
    with path.open("rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


def test_storage_of_real_shapes_at_4_bits_is_about_a_quarter() -> None:
    # SmolLM2-135M, r = 32: q/o (576 x 576), k/v (192 x 576); one float16 scale per 64 values: 4 + 16/64 = 4.25 bits per value
    # (26.6 % of the 16-bit bytes, as RESULTS.md section 15 measured).
    from hydraopt.eval.quantized_lora import separate_nbytes
    from hydraopt.types import ModuleSpec

    modules = [ModuleSpec("q", 576, 576, 32), ModuleSpec("k", 192, 576, 32)]
    ratio = separate_nbytes(modules, 4, 64) / separate_nbytes(modules, 16, 64)
    assert ratio == pytest.approx(4.25 / 16)
    assert math.isclose(
        separate_nbytes(modules, 8, 64) / separate_nbytes(modules, 16, 64), 8.25 / 16
    )


def test_cache_id_follows_the_quantized_weights(root, make_adapter, tmp_path) -> None:
    ids = {
        (b, g): QuantizedLora(root, TASKS, b, g).cache_id("t0") for b in (8, 4) for g in (16, 32)
    }
    assert len(set(ids.values())) == 4
    assert QuantizedLora(root, TASKS, 4, 16, label="x").cache_id("t0") == ids[(4, 16)]
    assert PerTaskLora(root=root).cache_id("t0") not in ids.values()
    moved = tmp_path / "moved"
    (root).rename(moved)  # the id follows the weights, not the path
    assert QuantizedLora(moved, TASKS, 4, 16).cache_id("t0") == ids[(4, 16)]
    other = make_adapter("t0", seed=99, alpha=12, parent=tmp_path / "other")
    assert QuantizedLora(other.parent, ("t0",), 4, 16).cache_id("t0") != ids[(4, 16)]


def test_parse_system_lora_at_bits(root) -> None:
    system = parse_system(f"lora@4={root}:tiny 4", tasks=TASKS, group_size=32)
    assert isinstance(system, QuantizedLora)
    assert (system.bits, system.group_size, system.label, system.tasks) == (4, 32, "tiny 4", TASKS)
    assert parse_system(f"lora@8={root}", tasks=TASKS).label == "LoRA 8-bit"
    assert isinstance(parse_system(f"lora@16={root}", tasks=TASKS), PerTaskLora)
    for bad in (f"lora@3={root}", f"vera@4={root}", f"bundle@8={root}", f"lora@={root}"):
        with pytest.raises(HydraoptError, match="unknown kind"):
            parse_system(bad, tasks=TASKS)
    with pytest.raises(HydraoptError, match="even"):
        parse_system(f"lora@4={root}", tasks=TASKS, group_size=5)


def test_check_tasks_refuses_missing_and_vera(root, tmp_path) -> None:
    system = QuantizedLora(root, TASKS, 4)
    with pytest.raises(HydraoptError, match="covers"):
        system.check_tasks(["t9"])
    with pytest.raises(HydraoptError, match="no PEFT adapter"):
        QuantizedLora(root, ("t0", "t9"), 4).check_tasks(["t0"])
    vera = tmp_path / "vera" / "t0"
    vera.mkdir(parents=True)
    (vera / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA"}))
    with pytest.raises(HydraoptError):
        QuantizedLora(vera.parent, ("t0",), 4).check_tasks(["t0"])
