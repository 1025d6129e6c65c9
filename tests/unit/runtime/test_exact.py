"""The runtime against PEFT loading the exported adapter of each task: logits and greedy tokens.

Every bundle kind (HydraOpt M = 2 and M = K, a classic merge M = 1, an A-only merge M = K, VeRA
with M = 2 and M = 1) is saved in float16, exported, and each task's export loaded by PEFT on a
fresh copy of the base model. The runtime serves all tasks from one model, in mixed batches.
"""

from __future__ import annotations

import pytest
import torch
from unit.runtime.conftest import BUNDLES, TASKS

from hydraopt.eval.generate import generate as peft_generate
from hydraopt.eval.model import load_base_model
from hydraopt.runtime import load_model

PROMPTS = ["hello there", "What is 2+2?", "Fix: she go home", "a", "Summarize: cats nap a lot."]


def peft_model_for(base, export, task):
    from peft import PeftModel

    model, tokenizer = load_base_model(base)
    return PeftModel.from_pretrained(model, str(export / task)).eval(), tokenizer


def padded(tokenizer, texts):
    return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_logits_of_a_mixed_batch_equal_peft_per_task(name, chat_base, chat_bundle):
    bundle_dir, export = chat_bundle(name)
    runtime = load_model(bundle_dir, chat_base)
    prompts = [runtime.chat_prompt(p) for p in PROMPTS[:3]] * len(TASKS)
    tasks = [t for t in TASKS for _ in range(3)]  # each task on every prompt, all in one batch
    batch = padded(runtime.tokenizer, prompts)
    got = runtime(tasks, **batch).logits  # (9, T, V)
    base_model, tokenizer = load_base_model(chat_base)
    with torch.inference_mode():
        base_logits = base_model(**batch).logits
    mask = batch["attention_mask"].bool()
    for i, task in enumerate(TASKS):
        peft, _ = peft_model_for(chat_base, export, task)
        with torch.inference_mode():
            want = peft(**batch).logits  # (9, T, V)
        rows = slice(3 * i, 3 * i + 3)
        # float16 storage rounds head/scale in the export but not in the runtime: ~1e-3 apart
        torch.testing.assert_close(
            got[rows][mask[rows]], want[rows][mask[rows]], atol=2e-3, rtol=1e-3
        )
        # and the adapter matters: the update moves the logits far more than that tolerance
        assert (want[rows][mask[rows]] - base_logits[rows][mask[rows]]).abs().max() > 0.1


@pytest.mark.parametrize("name", ["hydraopt-m2", "ties-m1", "vera-hydraopt-m2"])
def test_greedy_generations_equal_peft_generate(name, chat_base, chat_bundle):
    bundle_dir, export = chat_bundle(name)
    runtime = load_model(bundle_dir, chat_base)
    # one mixed batch holding every (task, prompt) pair
    tasks = [t for t in TASKS for _ in PROMPTS]
    got = runtime.generate(PROMPTS * len(TASKS), tasks, max_new_tokens=12, batch_size=64)
    outputs = []
    for task in TASKS:
        peft, tokenizer = peft_model_for(chat_base, export, task)
        chat = [runtime.chat_prompt(p) for p in PROMPTS]
        outputs += peft_generate(peft, tokenizer, chat, max_new_tokens=12, progress=False)
    assert got == outputs
    base_model, tokenizer = load_base_model(chat_base)
    chat = [runtime.chat_prompt(p) for p in PROMPTS]
    base = peft_generate(base_model, tokenizer, chat, max_new_tokens=12, progress=False)
    assert got[: len(PROMPTS)] != base  # the adapters change the answers


def test_runtime_without_tasks_refuses_and_switching_copies_nothing(chat_base, chat_bundle):
    runtime = load_model(chat_bundle("hydraopt-m2")[0], chat_base)
    batch = padded(runtime.tokenizer, ["ab"])
    with pytest.raises(RuntimeError, match="no task per row"):
        runtime.model(**batch)
    before = {n: b.data_ptr() for n, b in runtime.model.named_buffers()}
    for task in TASKS:
        runtime([task], **batch)
    assert {n: b.data_ptr() for n, b in runtime.model.named_buffers()} == before
