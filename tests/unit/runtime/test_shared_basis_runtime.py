"""The runtime serves a ``shared_basis`` bundle (through ``factored_view()``: A' = Vᵀ,
U held once, the K cores S_i as heads, identity routing) exactly as PEFT serves its export
(per-module ranks via rank_pattern)."""

from __future__ import annotations

import torch
from unit.runtime.conftest import TASKS
from unit.runtime.test_exact import PROMPTS, padded, peft_model_for

import hydraopt
from hydraopt.eval.generate import generate as peft_generate
from hydraopt.eval.model import load_base_model
from hydraopt.runtime import load_model


def test_greedy_outputs_and_logits_equal_peft_on_the_export(chat_base, chat_adapters, tmp_path):
    aset = hydraopt.load_adapter_set(chat_adapters["lora"])
    bundle = hydraopt.merge_adapter_set(aset, "shared_basis", {"budget": 40.0})
    assert len({rec.rank for rec in bundle.merged.values()}) > 1  # ranks differ per module
    hydraopt.save_bundle(bundle, tmp_path / "bundle")  # float16
    loaded = hydraopt.load_any_bundle(tmp_path / "bundle")
    # The runtime applies U and S_i in float32 from the stored float16 U and cores; a float32
    # export writes their product U S_i, a float16 one (the default) rounds it once more (~1e-3
    # relative; this random model's logits move by up to ~0.03 under it), which can flip a
    # near-tie of its greedy choice: the runtime is compared with the float32 export.
    hydraopt.export_peft_adapters(loaded, tmp_path / "export", dtype="float32")
    runtime = load_model(tmp_path / "bundle", chat_base)

    tasks = [t for t in TASKS for _ in PROMPTS]  # one mixed batch of every (task, prompt)
    got = runtime.generate(PROMPTS * len(TASKS), tasks, max_new_tokens=12, batch_size=64)
    want = []
    for task in TASKS:
        peft, tokenizer = peft_model_for(chat_base, tmp_path / "export", task)
        chat = [runtime.chat_prompt(p) for p in PROMPTS]
        want += peft_generate(peft, tokenizer, chat, max_new_tokens=12, progress=False)
    assert got == want

    base_model, tokenizer = load_base_model(chat_base)
    chat = [runtime.chat_prompt(p) for p in PROMPTS]
    assert got[: len(PROMPTS)] != peft_generate(
        base_model, tokenizer, chat, max_new_tokens=12, progress=False
    )  # the adapters change the answers

    batch = padded(runtime.tokenizer, [runtime.chat_prompt(p) for p in PROMPTS[:3]])
    for task in TASKS:
        peft, _ = peft_model_for(chat_base, tmp_path / "export", task)
        with torch.inference_mode():
            want_logits = peft(**batch).logits
        got_logits = runtime([task] * 3, **batch).logits
        mask = batch["attention_mask"].bool()
        # the runtime's own layer against PEFT's, on the same float32 U S_i
        torch.testing.assert_close(got_logits[mask], want_logits[mask], atol=2e-3, rtol=1e-3)
