"""Part (d) of benchmarks/serving.py: greedy answers of `hydraopt generate` and of the server vs
PEFT loading each task's exported adapter, ``--exact-prompts`` prompts per task, every bundle.

For each bundle: PEFT loads the K exports (``hydraopt export``) on a copy of the base model and
answers each task's prompts with that task's adapter set (``eval.generate``, batched); the
``hydraopt generate`` command (in process, ``--input`` JSONL with every task's prompts interleaved,
``--raw``) answers the same prompts in mixed batches; and a real ``hydraopt serve`` app (uvicorn on
127.0.0.1, continuous batching) answers them as concurrent ``/v1/completions`` requests over HTTP.
Prompts are the shortest of each task's test split (decoding cost), already in the chat template.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def task_prompts(args: argparse.Namespace, tokenizer, tasks: list[str]) -> dict[str, list[str]]:
    from hydraopt.eval.tasks import build_prompt, load_split, load_task

    prompts = {}
    for t in tasks:
        spec = load_task(args.tasks_root / t)
        texts = [
            build_prompt(tokenizer, spec, ex.input)
            for ex in load_split(args.tasks_root / t, "test")
        ]
        prompts[t] = sorted(texts, key=len)[: args.exact_prompts]
    return prompts


def peft_reference(base_model, tokenizer, export: Path, prompts, args) -> dict[str, list[str]]:
    from peft import PeftModel

    from hydraopt.eval.generate import generate

    tasks = list(prompts)
    peft = PeftModel.from_pretrained(
        copy.deepcopy(base_model), str(export / tasks[0]), adapter_name=tasks[0]
    )
    for t in tasks[1:]:
        peft.load_adapter(str(export / t), adapter_name=t)
    peft.eval()
    want = {}
    for t in tasks:
        peft.set_adapter(t)
        want[t] = generate(
            peft, tokenizer, prompts[t], args.new_tokens, batch_size=args.batch, progress=False
        )
    del peft
    gc.collect()
    return want


def cli_generate(bundle: Path, prompts: dict[str, list[str]], args) -> dict[str, list[str]]:
    """`hydraopt generate BUNDLE --input FILE --raw`, in process; answers per task."""
    from hydraopt.cli.main import main

    n = len(next(iter(prompts.values())))
    rows = [{"task": t, "prompt": prompts[t][i]} for i in range(n) for t in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = io.StringIO()
        argv = ["generate", str(bundle), "--input", str(path), "--raw"]
        argv += ["--max-tokens", str(args.new_tokens), "--batch-size", str(args.batch)]
        argv += ["--threads", str(args.threads)]
        with contextlib.redirect_stdout(out):
            code = main(argv)
    if code != 0:
        raise RuntimeError(f"hydraopt generate exited {code}")
    got: dict[str, list[str]] = {t: [] for t in prompts}
    for line in out.getvalue().splitlines():
        row = json.loads(line)
        got[row["task"]].append(row["output"])
    return got


def server_answers(runtime, prompts: dict[str, list[str]], args) -> dict[str, list[str]]:
    """A real server over ``runtime``; every prompt sent at once as ``/v1/completions``."""
    import httpx
    import uvicorn

    from hydraopt.serve import create_app

    app = create_app(runtime, max_batch=args.batch, max_tokens_limit=args.new_tokens)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    pairs = [(t, p) for t in prompts for p in prompts[t]]

    def ask(pair: tuple[str, str]) -> str:
        body = {"model": pair[0], "prompt": pair[1], "max_tokens": args.new_tokens}
        r = client.post(url, json=body)
        r.raise_for_status()
        return str(r.json()["choices"][0]["text"]).strip()

    try:
        with httpx.Client(timeout=None) as client, ThreadPoolExecutor(len(pairs)) as pool:
            answers = list(pool.map(ask, pairs))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    got: dict[str, list[str]] = {t: [] for t in prompts}
    for (t, _), a in zip(pairs, answers, strict=True):
        got[t].append(a)
    return got


def measure_exactness(args, base_model, tokenizer, bundles, exports, tasks) -> list[dict[str, Any]]:
    from hydraopt.runtime import RuntimeModel, shared_factors

    prompts = task_prompts(args, tokenizer, tasks)
    out = []
    for label, path in bundles.items():
        print(f"exactness {label}: PEFT on the exports ...", file=sys.stderr, flush=True)
        want = peft_reference(base_model, tokenizer, exports[label], prompts, args)
        print(f"exactness {label}: hydraopt generate ...", file=sys.stderr, flush=True)
        generated = cli_generate(path, prompts, args)
        print(f"exactness {label}: hydraopt serve ...", file=sys.stderr, flush=True)
        runtime = RuntimeModel(copy.deepcopy(base_model), tokenizer, shared_factors(path))
        served = server_answers(runtime, prompts, args)
        del runtime
        gc.collect()
        row: dict[str, Any] = {
            "bundle": label,
            "heads": shared_factors(path).num_heads,
            "per_task": len(prompts[tasks[0]]),
            "new_tokens": args.new_tokens,
            "prompts": sum(len(p) for p in prompts.values()),
        }
        for name, got in (("generate", generated), ("server", served)):
            row[f"{name}_equal"] = sum(
                a == b for t in tasks for a, b in zip(got[t], want[t], strict=True)
            )
            row[f"{name}_per_task"] = {
                t: sum(a == b for a, b in zip(got[t], want[t], strict=True)) for t in tasks
            }
            row[f"{name}_differ"] = [
                {"task": t, "prompt": p, "got": a, "want": b}
                for t in tasks
                for p, a, b in zip(prompts[t], got[t], want[t], strict=True)
                if a != b
            ][:5]
        out.append(row)
    return out
