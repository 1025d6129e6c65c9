"""Shared fixtures: tiny real Llama models and real PEFT adapters built from them.

Adapters are written by PEFT itself (``save_pretrained``) so every test reads the real on-disk
format; weights are drawn from an explicit generator, never the global RNG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HYDRAOPT_SHARED", REPO.parent / "shared"))
ENGLISH_TASKS = ("en-gc", "en-sr", "en-ts", "en-ta", "en-qa")


def _real_adapters() -> Path:
    # The reference adapters beside the checkout when present; else the project's own in
    # examples/adapters (same five tasks, r = 32, same base and seed-0 A), so a fresh clone runs
    # the tests on real adapters too.
    for root in (SHARED / "adapters", REPO / "examples" / "adapters"):
        if all((root / t / "adapter_config.json").is_file() for t in ENGLISH_TASKS):
            return root
    return SHARED / "adapters"


SHARED_ADAPTERS = _real_adapters()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="session", autouse=True)
def ray_temp_dir(tmp_path_factory) -> None:
    """Ray sessions (tests of the Ray engine) under the test run's tmp dir, not /tmp/ray, where
    each one left ~200 KB of logs and sockets behind."""
    root = tmp_path_factory.mktemp("ray")
    os.environ.setdefault("RAY_TMPDIR", str(root))


def tiny_llama_config():
    from transformers import LlamaConfig

    # kv heads < heads so k/v have a different shape than q/o, like SmolLM2 and Llama-3.2.
    return LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama saved with save_pretrained (the base model of the tiny adapters)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # model init uses the global RNG; isolated to this fixture
    model = LlamaForCausalLM(tiny_llama_config())
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


AdapterFactory = Callable[..., Path]


@pytest.fixture
def make_adapter(tmp_path, tiny_base) -> AdapterFactory:
    """Build a real PEFT LoRA adapter dir on the tiny base model.

    Keyword args: name, r, alpha, seed, shared_a_seed (same A for every adapter given the same
    value), use_rslora, rank_pattern, alpha_pattern, dtype, and config overrides.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    def build(
        name: str,
        *,
        r: int = 4,
        alpha: float = 8,
        seed: int = 0,
        shared_a_seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        parent: Path | None = None,
        **config_kwargs,
    ) -> Path:
        model = LlamaForCausalLM.from_pretrained(tiny_base)
        cfg = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, **config_kwargs
        )
        peft_model = get_peft_model(model, cfg)
        gen = torch.Generator().manual_seed(seed)
        gen_a = torch.Generator().manual_seed(shared_a_seed) if shared_a_seed is not None else gen
        with torch.no_grad():
            for module in peft_model.modules():
                if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                    a = module.lora_A["default"].weight
                    b = module.lora_B["default"].weight
                    a.copy_(torch.randn(a.shape, generator=gen_a) * 0.3)
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
        out = (parent or tmp_path) / name
        peft_model.save_pretrained(out)
        if dtype != torch.float32:
            from safetensors.torch import load_file, save_file

            f = out / "adapter_model.safetensors"
            save_file({k: v.to(dtype) for k, v in load_file(str(f)).items()}, str(f))
        return out

    return build


def edit_config(adapter: Path, **changes) -> None:
    """Rewrite keys of an adapter's adapter_config.json (for bad-input tests)."""
    p = adapter / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def requires_shared_adapters():
    return pytest.mark.skipif(
        not all((SHARED_ADAPTERS / t / "adapter_config.json").is_file() for t in ENGLISH_TASKS),
        reason=f"real LoRA adapters for {ENGLISH_TASKS} found neither under {SHARED_ADAPTERS} "
        "nor under examples/adapters",
    )
