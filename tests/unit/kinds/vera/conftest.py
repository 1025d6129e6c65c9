"""Fixtures for VeRA tests: real PEFT VeRA adapter dirs on the tiny Llama of tests/conftest.py.

Adapters are made by PEFT itself (``VeraConfig`` + ``get_peft_model`` + ``save_pretrained``), with
λb and λd drawn from explicit generators (PEFT initialises λb to zero, which would merge to
nothing), so every test reads the real on-disk format.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TARGETS

VeraFactory = Callable[..., Path]


@pytest.fixture
def make_vera_adapter(tmp_path, tiny_base) -> VeraFactory:
    """Build a real PEFT VeRA adapter dir on the tiny base model.

    Keyword args: name, r, seed (λb and λd), shared_d_seed (same λd for every adapter given the
    same value), shared_b_seed (same λb), prng_key, save_projection, targets, dtype, parent, and
    VeraConfig overrides.
    """
    from peft import VeraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    def build(
        name: str,
        *,
        r: int = 4,
        seed: int = 0,
        shared_d_seed: int | None = None,
        shared_b_seed: int | None = None,
        prng_key: int = 0,
        save_projection: bool = True,
        targets: list[str] | None = None,
        dtype: torch.dtype = torch.float32,
        parent: Path | None = None,
        **config_kwargs,
    ) -> Path:
        model = LlamaForCausalLM.from_pretrained(tiny_base)
        cfg = VeraConfig(
            r=r,
            target_modules=targets or TARGETS,
            projection_prng_key=prng_key,
            save_projection=save_projection,
            **config_kwargs,
        )
        peft_model = get_peft_model(model, cfg)
        gen = torch.Generator().manual_seed(seed)
        gen_d = torch.Generator().manual_seed(shared_d_seed) if shared_d_seed is not None else gen
        gen_b = torch.Generator().manual_seed(shared_b_seed) if shared_b_seed is not None else gen
        with torch.no_grad():
            for module in peft_model.modules():
                if "default" in getattr(module, "vera_lambda_b", {}):
                    lam_b = module.vera_lambda_b["default"]
                    lam_d = module.vera_lambda_d["default"]
                    lam_b.copy_(torch.randn(lam_b.shape, generator=gen_b) * 0.5)
                    lam_d.copy_(0.1 + torch.randn(lam_d.shape, generator=gen_d) * 0.5)
        out = (parent or tmp_path) / name
        peft_model.save_pretrained(out)
        if dtype != torch.float32:
            from safetensors.torch import load_file, save_file

            f = out / "adapter_model.safetensors"
            save_file({k: v.to(dtype) for k, v in load_file(str(f)).items()}, str(f))
        return out

    return build


@pytest.fixture
def peft_deltas(tiny_base) -> Callable[[Path], dict[str, torch.Tensor]]:
    """ΔW of every VeRA module as PEFT computes it after ``PeftModel.from_pretrained(base, dir)``."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    def compute(adapter: Path) -> dict[str, torch.Tensor]:
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), adapter)
        out = {}
        for name, module in model.base_model.model.named_modules():
            if "default" in getattr(module, "vera_lambda_b", {}):
                out[name] = module.get_delta_weight("default").detach()
        return out

    return compute
