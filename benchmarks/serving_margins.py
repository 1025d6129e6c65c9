"""Part (e) of benchmarks/serving.py: how close to a tie each greedy step of the exactness prompts
is, and how far the runtime's logits are from PEFT's on the same tokens.

Equal greedy answers (part d) say nothing about how close a comparison came to flipping. For
every prompt of part (d) and every bundle, PEFT with the task's exported adapter decodes the
answer greedily, one prompt at a time (no padding), keeping each step's logits; the runtime then
reads the prompt plus PEFT's answer in one forward pass routed to the task (teacher forcing), so
both are scored on the same tokens. Recorded per bundle:

- ``min_margin``: the smallest gap between PEFT's top-1 and top-2 logits over all generated steps
  (a step with a gap below ``max_abs_diff`` could flip under float noise alone);
- ``max_abs_diff``: the largest |runtime − PEFT| logit over all generated steps and the vocabulary;
- ``argmax_differs``: steps where the runtime's argmax is not PEFT's token, each with PEFT's
  margin there (so a difference caused by a near-tie is visible as such, not hidden).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path
from typing import Any

import torch


def _peft_model(base_model, export: Path, tasks: list[str]):
    from peft import PeftModel

    peft = PeftModel.from_pretrained(
        copy.deepcopy(base_model), str(export / tasks[0]), adapter_name=tasks[0]
    )
    for t in tasks[1:]:
        peft.load_adapter(str(export / t), adapter_name=t)
    return peft.eval()


def _greedy_with_logits(peft, tokenizer, prompt_ids: list[int], n: int, stops: list[int]):
    """PEFT's greedy answer (token ids, cut after the first stop) and each step's logits (n, V)."""
    with torch.inference_mode():
        out = peft.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    answer = out.sequences[0, len(prompt_ids) :].tolist()
    logits = torch.cat(out.logits).float()  # (steps, V)
    return answer[: logits.shape[0]], logits


def margins_of_bundle(
    args: argparse.Namespace, base_model, tokenizer, bundle: Path, export: Path, prompts
) -> dict[str, Any]:
    from hydraopt.eval.generate import stop_token_ids
    from hydraopt.runtime import RuntimeModel, shared_factors

    tasks = list(prompts)
    peft = _peft_model(base_model, export, tasks)
    runtime = RuntimeModel(copy.deepcopy(base_model), tokenizer, shared_factors(bundle))
    stops = stop_token_ids(base_model, tokenizer)
    min_margin, max_diff, steps = float("inf"), 0.0, 0
    closest: dict[str, Any] = {}
    differs: list[dict[str, Any]] = []
    for t in tasks:
        peft.set_adapter(t)
        for i, text in enumerate(prompts[t]):
            ids = runtime.encode(text)
            answer, want = _greedy_with_logits(peft, tokenizer, ids, args.new_tokens, stops)
            full = torch.tensor([ids + answer])  # (1, T)
            got = runtime([t], input_ids=full, attention_mask=torch.ones_like(full)).logits
            got = got[0, len(ids) - 1 : len(ids) - 1 + len(answer)].float()  # (steps, V)
            top2 = want.topk(2, dim=-1).values  # (steps, 2)
            margin = top2[:, 0] - top2[:, 1]  # (steps,)
            diff = (got - want).abs().amax(dim=-1)  # (steps,)
            steps += len(answer)
            max_diff = max(max_diff, float(diff.max()))
            j = int(margin.argmin())
            if float(margin[j]) < min_margin:
                min_margin = float(margin[j])
                closest = {"task": t, "prompt_index": i, "step": j, "margin": min_margin}
                closest["logit_diff_there"] = float(diff[j])
            for s in (got.argmax(-1) != torch.tensor(answer)).nonzero().flatten().tolist():
                differs.append(
                    {
                        "task": t,
                        "prompt_index": i,
                        "step": s,
                        "peft_margin": float(margin[s]),
                        "logit_diff": float(diff[s]),
                    }
                )
        print(f"margins: {t} done", file=sys.stderr, flush=True)
    del peft, runtime
    gc.collect()
    return {
        "steps": steps,
        "min_margin": min_margin,
        "closest_step": closest,
        "max_abs_diff": max_diff,
        "argmax_differs": differs,
    }


def measure_margins(args, base_model, tokenizer, bundles, exports, tasks) -> list[dict[str, Any]]:
    from serving_exactness import task_prompts

    prompts = task_prompts(args, tokenizer, tasks)
    out = []
    for label, path in bundles.items():
        print(f"margins {label} ...", file=sys.stderr, flush=True)
        row = margins_of_bundle(args, base_model, tokenizer, path, exports[label], prompts)
        out.append({"bundle": label, "prompts": sum(len(p) for p in prompts.values()), **row})
    return out
