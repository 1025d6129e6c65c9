"""Continuous batching: rows that join a running batch and leave it early decode exactly as alone.

Each request is decoded alone (a batch of one), then all of them through one :class:`Decoder`
that admits them at different steps — a longer prompt joining (the running cache is left-padded),
shorter ones joining (theirs is), rows of other tasks and caps leaving while others go on — and
the tokens must be the same, and equal PEFT's with the task's exported adapter.
"""

from __future__ import annotations

import pytest
import torch
from unit.runtime.conftest import TASKS

from hydraopt.eval.generate import generate as peft_generate
from hydraopt.eval.model import load_base_model
from hydraopt.runtime import kv_cache, load_model
from hydraopt.runtime.generation import Decoder, RowRequest, SamplingParams, decode

PROMPTS = [
    "hi",
    "What is 2+2?",
    "Fix: she go home yesterday and then",
    "a",
    "Summarize: cats nap a lot, and dogs bark at the mailman every single morning.",
    "ok?",
]
CAPS = [12, 5, 12, 3, 12, 8]
# when each request joins: after this many decode steps of the running batch
JOIN_AT = [0, 0, 2, 2, 4, 7]


@pytest.fixture(scope="module")
def runtime(chat_base, chat_bundle):
    return load_model(chat_bundle("hydraopt-m2")[0], chat_base)


def requests(runtime, sampling=False):
    return [
        RowRequest(
            i,
            runtime.encode(runtime.chat_prompt(p)),
            TASKS[i % len(TASKS)],
            SamplingParams(CAPS[i], temperature=1.3 if sampling and i % 2 else 0.0, seed=i),
        )
        for i, p in enumerate(PROMPTS)
    ]


class Tracing(Decoder):
    """A Decoder that keeps every row's logits, step by step (tokens alone are a weak check on
    a tiny model: a misaligned cache can change the logits without changing the argmax)."""

    def __init__(self, runtime):
        super().__init__(runtime)
        self.logits = {}

    def _advance(self, rows, logits):
        for row, row_logits in zip(rows, logits, strict=True):
            self.logits.setdefault(row.request.key, []).append(row_logits)
        return super()._advance(rows, logits)


def alone(runtime, reqs):
    """Each request decoded in a batch of its own: results and logits per step."""
    results, logits = [], []
    for r in reqs:
        decoder = Tracing(runtime)
        done = dict(decoder.add([r]))
        while decoder:
            done.update(decoder.step())
        results.append(done[r.key])
        logits.append(torch.stack(decoder.logits[r.key]))
    return results, logits


def staggered(runtime, reqs, logits=None):
    """Decode ``reqs`` in one Decoder, request i joining after JOIN_AT[i] steps."""
    decoder = Tracing(runtime)
    done, sizes, step = {}, [], 0
    while len(done) < len(reqs):
        joining = [r for r, at in zip(reqs, JOIN_AT, strict=True) if at == step]
        done.update(decoder.add(joining))
        sizes.append(len(decoder))
        if decoder.rows:  # the cache holds exactly the columns the mask describes
            assert kv_cache.length(decoder.cache) == decoder.mask.shape[1]
            assert bool(decoder.mask[:, 0].any())  # no column that no row uses
        done.update(decoder.step())
        step += 1
    if logits is not None:
        logits.extend(torch.stack(decoder.logits[r.key]) for r in reqs)
    return [done[r.key] for r in reqs], sizes


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "seeded-sampling"])
def test_rows_joining_and_leaving_mid_flight_decode_as_alone(runtime, sampling):
    reqs = requests(runtime, sampling)
    single, single_logits = alone(runtime, reqs)
    logits = []
    together, sizes = staggered(runtime, reqs, logits)
    assert together == single  # tokens, text and finish reason
    for got, want in zip(logits, single_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the schedule really mixed: several rows at once, and the batch shrank before it grew again
    assert max(sizes) >= 3
    assert any(b < a for a, b in zip(sizes, sizes[1:], strict=False))
    assert any(b > a for a, b in zip(sizes, sizes[1:], strict=False))


def test_staggered_greedy_rows_equal_peft_exports(runtime, chat_base, chat_bundle):
    from peft import PeftModel

    export = chat_bundle("hydraopt-m2")[1]
    together, _ = staggered(runtime, requests(runtime))
    for t, task in enumerate(TASKS):
        model, tokenizer = load_base_model(chat_base)
        peft = PeftModel.from_pretrained(model, str(export / task)).eval()
        rows = [i for i in range(len(PROMPTS)) if i % len(TASKS) == t]
        for i in rows:  # each row's own cap: PEFT's greedy answer with that many tokens
            want = peft_generate(
                peft,
                tokenizer,
                [runtime.chat_prompt(PROMPTS[i])],
                max_new_tokens=CAPS[i],
                progress=False,
            )
            assert together[i].text.strip() == want[0]


def test_decode_refills_rows_as_they_leave(runtime):
    reqs = requests(runtime)
    assert decode(runtime, reqs, max_batch=2) == alone(runtime, reqs)[0]


def test_unknown_task_and_empty_prompt_are_refused_before_anything_runs(runtime):
    decoder = Decoder(runtime)
    with pytest.raises(KeyError, match="nope"):
        decoder.add([RowRequest(0, [5, 6], "nope", SamplingParams(3))])
    with pytest.raises(ValueError, match="at least one token"):
        decoder.add([RowRequest(0, [], TASKS[0], SamplingParams(3))])
    assert len(decoder) == 0 and decoder.cache is None
