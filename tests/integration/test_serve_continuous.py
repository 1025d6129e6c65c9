"""Continuous batching over HTTP: requests sent while a long answer is decoding join it mid-flight.

A real uvicorn server on 127.0.0.1 (tiny chat model, HydraOpt M = 2 bundle of three real PEFT
adapters), called with httpx. A long streamed request starts; once its first piece arrives,
requests of every task, with different prompts and caps, are sent one after another. Each answer
must equal PEFT's with that task's exported adapter and that cap (so: the same as served alone),
the newcomers must have been admitted while the long row was decoding, and the short ones must
be answered before the long one ends (they did not wait for the batch). Every forward pass of the
server's model sleeps a few ms, so that the long answer outlasts the sending of the others.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from unit.runtime.tiny_chat import build_bundle_and_export, peft_answers, running_server

TASKS = ("t0", "t1", "t2")
PROMPTS = ["hello there", "What is 2+2?", "Fix: she go home", "abc", "Summarize: cats nap."]
LONG = 48
# (task, prompt index, max_tokens) of the requests sent while the long one decodes
LATER = [("t1", 1, 4), ("t2", 3, 9), ("t0", 2, 6), ("t1", 4, 20), ("t2", 0, 3), ("t0", 1, 12)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_bundle_and_export(tmp_path_factory.mktemp("continuous"), TASKS)


@pytest.fixture(scope="module")
def expected(setup):
    """(task, prompt index, cap) -> PEFT's greedy answer with the task's exported adapter."""
    base, _, export = setup
    want = {}
    caps = {("t0", LONG)} | {(t, cap) for t, _, cap in LATER}
    for task, cap in sorted(caps):
        for i, answer in enumerate(peft_answers(base, export / task, PROMPTS, cap)):
            want[task, i, cap] = answer
    return want


def test_requests_join_a_running_batch_and_answer_as_alone(setup, expected):
    from hydraopt.runtime import load_model
    from hydraopt.serve import create_app

    base, bundle, _ = setup
    runtime = load_model(bundle, base)
    runtime.model.register_forward_pre_hook(lambda *_: time.sleep(0.03))
    app = create_app(runtime, max_batch=8, max_tokens_limit=64, wait_s=0.01)
    # the long request: the prompt whose t0 answer is longest, so it runs for many steps
    long_prompt = max(range(len(PROMPTS)), key=lambda i: len(expected["t0", i, LONG]))
    assert len(expected["t0", long_prompt, LONG]) >= 30

    def chat(task, i, cap):
        body = {
            "model": task,
            "messages": [{"role": "user", "content": PROMPTS[i]}],
            "max_tokens": cap,
        }
        r = client.post("/chat/completions", json=body)
        return r, time.monotonic()

    with running_server(app) as client, ThreadPoolExecutor(len(LATER)) as pool:
        body = {
            "model": "t0",
            "messages": [{"role": "user", "content": PROMPTS[long_prompt]}],
            "max_tokens": LONG,
            "stream": True,
        }
        pieces, later = [], []
        with client.stream("POST", "/chat/completions", json=body) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
                if len(pieces) == 1:  # the long row is decoding: send the others, staggered
                    for k, spec in enumerate(LATER):
                        later.append(pool.submit(lambda s=spec, d=0.04 * k: _after(d, chat, *s)))
            long_done = time.monotonic()
        answers = [f.result() for f in later]
    assert "".join(pieces).strip() == expected["t0", long_prompt, LONG]
    for (task, i, cap), (r, done) in zip(LATER, answers, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == expected[task, i, cap]
        if cap <= 12:  # a short answer does not wait for the long one to end
            assert done < long_done
    batcher = app.state.batcher
    assert batcher.joined_running >= len(LATER) - 1  # (the last may find the long row gone)
    assert batcher.largest_batch >= 3


def _after(delay, fn, *args):
    time.sleep(delay)
    return fn(*args)
