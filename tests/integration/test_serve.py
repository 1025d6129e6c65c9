"""``hydraopt serve`` end to end: a real uvicorn server on 127.0.0.1, called over HTTP with httpx.

The server runs the tiny chat model of tests/unit/runtime/tiny_chat.py with a HydraOpt M = 2
bundle of three real PEFT adapters; every answer is compared with PEFT loading that task's
exported adapter. Bad requests must get 4xx with an OpenAI error body and leave the server
answering correctly.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from unit.runtime.tiny_chat import CONTEXT, build_bundle_and_export, peft_answers, running_server

TASKS = ("t0", "t1", "t2")
PROMPTS = ["hello there", "What is 2+2?", "Fix: she go home", "abc"]
MAX = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_bundle_and_export(tmp_path_factory.mktemp("serve"), TASKS)


@pytest.fixture(scope="module")
def expected(setup):
    """task -> PEFT's greedy answers to PROMPTS (chat template) with the exported adapter."""
    base, _, export = setup
    return {task: peft_answers(base, export / task, PROMPTS, MAX) for task in TASKS}


@pytest.fixture(scope="module")
def server(setup):
    from hydraopt.runtime import load_model
    from hydraopt.serve import create_app

    base, bundle, _ = setup
    app = create_app(load_model(bundle, base), max_batch=16, max_tokens_limit=64, wait_s=0.2)
    with running_server(app) as client:
        yield client, app


def chat(client, task, prompt, **extra):
    body = {"model": task, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX}
    return client.post("/chat/completions", json={**body, **extra})


def test_models_lists_the_tasks(server):
    client, _ = server
    data = client.get("/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == list(TASKS)


def test_concurrent_requests_for_every_task_are_batched_and_equal_peft(server, expected):
    client, app = server
    before = app.state.batcher.batches
    pairs = [(t, i) for t in TASKS for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(pairs)) as pool:
        responses = list(pool.map(lambda p: chat(client, p[0], PROMPTS[p[1]]), pairs))
    for (task, i), r in zip(pairs, responses, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == task and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"].strip() == expected[task][i]
        assert body["usage"]["completion_tokens"] >= 1
    # 12 requests sent at once ran in fewer forward batches than requests: tasks were mixed
    assert app.state.batcher.batches - before < len(pairs)
    assert app.state.batcher.largest_batch > 1


def test_completions_endpoint_takes_the_prompt_as_is(server, expected, setup):
    client, _ = server
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup[0])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True
    )
    r = client.post("/completions", json={"model": "t1", "prompt": prompt, "max_tokens": MAX})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].strip() == expected["t1"][0]


BAD_REQUESTS = [
    ("unknown task", {"model": "nope"}, 404, "model"),
    ("missing messages", {"messages": None}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("mistyped max_tokens", {"max_tokens": "5"}, 400, "max_tokens"),
    ("negative max_tokens", {"max_tokens": -1}, 400, "max_tokens"),
    ("too large max_tokens", {"max_tokens": 100000}, 400, "max_tokens"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("negative temperature", {"temperature": -0.5}, 400, "temperature"),
    ("two choices", {"n": 2}, 400, "n"),
    (
        "prompt longer than context",
        {"messages": [{"role": "user", "content": "x" * CONTEXT}]},
        400,
        "prompt",
    ),
]


@pytest.mark.parametrize(
    ("case", "change", "status", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(
    server, expected, case, change, status, param
):
    client, _ = server
    body = {"model": "t0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX}
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    with ThreadPoolExecutor(3) as pool:  # the bad request travels with good ones
        good = [pool.submit(chat, client, "t2", PROMPTS[i]) for i in range(2)]
        bad = client.post("/chat/completions", json=body)
        answers = [g.result() for g in good]
    assert bad.status_code == status, bad.text
    error = bad.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    for i, r in enumerate(answers):
        assert r.json()["choices"][0]["message"]["content"].strip() == expected["t2"][i]


def test_malformed_json_is_a_400_and_the_server_keeps_answering(server, expected):
    client, _ = server
    r = client.post(
        "/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/nowhere").status_code == 404
    assert (
        chat(client, "t0", PROMPTS[0]).json()["choices"][0]["message"]["content"].strip()
        == expected["t0"][0]
    )


def test_streaming_sends_the_same_text_in_server_sent_events(server, expected):
    client, _ = server
    body = {
        "model": "t1",
        "messages": [{"role": "user", "content": PROMPTS[1]}],
        "max_tokens": MAX,
        "stream": True,
    }
    pieces, finish = [], None
    with client.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[len("data: ") :])["choices"][0]
        pieces.append(choice["delta"].get("content", ""))
        finish = choice["finish_reason"] or finish
    assert len(pieces) > 2  # sent piece by piece, not in one chunk
    assert "".join(pieces).strip() == expected["t1"][1]
    assert finish in ("stop", "length")


def test_stop_strings_and_seeded_sampling(server, expected):
    client, _ = server
    full = expected["t0"][0]
    stop = full[3:5]
    r = chat(client, "t0", PROMPTS[0], stop=[stop]).json()
    assert r["choices"][0]["message"]["content"].strip() == full[: full.index(stop)].strip()
    assert r["choices"][0]["finish_reason"] == "stop"
    a = chat(client, "t0", PROMPTS[0], temperature=1.5, seed=7).json()
    b = chat(client, "t0", PROMPTS[0], temperature=1.5, seed=7).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_one_log_line_per_request(server, caplog):
    import logging

    client, _ = server
    caplog.set_level(logging.INFO, logger="hydraopt.serve")
    chat(client, "t1", PROMPTS[0])
    client.post("/chat/completions", json={"model": "nope", "messages": []})
    lines = [r.getMessage() for r in caplog.records if r.name == "hydraopt.serve"]
    assert len(lines) == 2
    assert lines[0].startswith("POST /v1/chat/completions 200 task=t1 ")
    assert lines[1].startswith("POST /v1/chat/completions 400 ")
