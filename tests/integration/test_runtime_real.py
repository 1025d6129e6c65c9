"""The runtime on the real base model and the five example adapters, against PEFT.

Bundles M = 1 (TIES), M = 2 (HydraOpt) and M = K (task arithmetic on A only) of
examples/adapters are installed into one SmolLM2-135M; a batch that mixes all five tasks must give
every task the greedy answers of PEFT loading that task's exported adapter, and logits within
float tolerance. (benchmarks/serving.py repeats the token check on 20 prompts per task.)
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hydraopt import (
    export_peft_adapters,
    load_adapter_set,
    load_any_bundle,
    merge_adapter_set,
    save_bundle,
)
from hydraopt.eval.generate import generate
from hydraopt.runtime import RuntimeModel, shared_factors

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "adapters"
TASKS = ("en-gc", "en-qa", "en-sr", "en-ta", "en-ts")
PROMPTS = {
    "en-gc": [
        "Fix the grammar: she go to school yesterday.",
        "Fix the grammar: Him and me is friends.",
    ],
    "en-qa": [
        "Context: Paris is the capital of France. Question: What is the capital of France?",
        "Who wrote Hamlet?",
    ],
    "en-sr": [
        "#Person1#: Are you coming to dinner tonight? Reply:",
        "#Person1#: Can you help me move on Sunday?",
    ],
    "en-ta": [
        "Make this polite: shut up and give me the report.",
        "Make this polite: this idea is stupid.",
    ],
    "en-ts": [
        "Summarize: #Person1#: I lost my keys. #Person2#: Check your coat pocket.",
        "Summarize: #Person1#: The train is late again.",
    ],
}
BUNDLES = {
    "M1": ("ties", {}),
    "M2": ("hydraopt", {"heads": 2, "refine_steps": 0}),
    "MK": ("task_arithmetic_a_only", {}),
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (EXAMPLES / "en-qa").is_dir(), reason="examples/adapters missing"),
]


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def real_bundle(request, tmp_path_factory) -> tuple[Path, Path]:
    method, options = BUNDLES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    bundle = merge_adapter_set(load_adapter_set([EXAMPLES / t for t in TASKS]), method, options)
    save_bundle(bundle, root / "bundle")
    export_peft_adapters(load_any_bundle(root / "bundle"), root / "export")
    return root / "bundle", root / "export"


def test_mixed_batch_equals_peft_exports_on_every_task(base_model, real_bundle):
    from peft import PeftModel

    model, tokenizer = base_model
    bundle_dir, export = real_bundle
    runtime = RuntimeModel(copy.deepcopy(model), tokenizer, shared_factors(bundle_dir))
    flat = [(t, p) for i in range(2) for t in TASKS for p in PROMPTS[t][i : i + 1]]  # interleaved
    got = runtime.generate(
        [p for _, p in flat], [t for t, _ in flat], max_new_tokens=16, batch_size=10
    )
    peft = PeftModel.from_pretrained(
        copy.deepcopy(model), str(export / TASKS[0]), adapter_name=TASKS[0]
    )
    for t in TASKS[1:]:
        peft.load_adapter(str(export / t), adapter_name=t)
    peft.eval()
    text = runtime.chat_prompt(PROMPTS["en-qa"][0])
    batch = tokenizer([text], add_special_tokens=False, return_tensors="pt")
    for t in TASKS:
        peft.set_adapter(t)
        mine = [g for (task, _), g in zip(flat, got, strict=True) if task == t]
        want = generate(
            peft, tokenizer, [runtime.chat_prompt(p) for p in PROMPTS[t]], 16, progress=False
        )
        assert mine == want, t
        with torch.inference_mode():
            reference = peft(**batch).logits
        torch.testing.assert_close(runtime([t], **batch).logits, reference, atol=2e-3, rtol=1e-3)
