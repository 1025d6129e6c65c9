"""``hydraopt generate BUNDLE --task T (--prompt TEXT | --input FILE.jsonl)``: greedy answers.

The bundle is installed into one base model (:func:`hydraopt.runtime.load_model`); rows of one
``--input`` file may name different tasks (a ``"task"`` field per line) and are decoded together in
mixed batches. Prompts are user turns of the chat template unless ``--raw``. Output: the answer
text for ``--prompt``; one JSON object a line (``task``, ``prompt``, ``output``) for ``--input``.

torch and transformers are imported inside :func:`run`, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydraopt.errors import HydraoptError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="answer prompts with a bundle's task(s) on one base model (greedy)",
        description="Install a bundle into the base model and greedy-decode prompts per task.",
    )
    p.add_argument(
        "bundle", type=Path, metavar="BUNDLE_DIR", help="a bundle dir written by hydraopt merge"
    )
    p.add_argument("--task", help='task of every prompt (an --input line\'s "task" overrides it)')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument(
        "--input",
        type=Path,
        metavar="FILE.jsonl",
        help='one JSON object a line: {"prompt": TEXT} or {"prompt": TEXT, "task": NAME}',
    )
    p.add_argument(
        "--max-tokens", type=int, default=64, help="cap on generated tokens (default 64)"
    )
    p.add_argument("--base-model", type=Path, help="HF model dir or GGUF (default: see docs)")
    p.add_argument("--raw", action="store_true", help="prompts are final text: no chat template")
    p.add_argument(
        "--batch-size", type=int, default=16, help="prompts per forward batch (default 16)"
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run)


def read_requests(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(task, prompt) pairs from ``--prompt`` or ``--input``; every error names its line."""
    if args.prompt is not None:
        rows = [{"prompt": args.prompt}]
        where = ["--prompt"]
    else:
        try:
            lines = args.input.read_text().splitlines()
        except OSError as e:
            raise HydraoptError(f"cannot read {args.input}: {e.strerror or e}") from e
        rows, where = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise HydraoptError(f"{args.input}:{number}: not JSON ({e.msg})") from e
            where.append(f"{args.input}:{number}")
        if not rows:
            raise HydraoptError(f"{args.input}: no prompts")
    out = []
    for row, place in zip(rows, where, strict=True):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise HydraoptError(f'{place}: need an object with a string "prompt"')
        task = row.get("task", args.task)
        if not isinstance(task, str):
            raise HydraoptError(f'{place}: no task (give --task or a "task" field)')
        out.append((task, row["prompt"]))
    return out


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise HydraoptError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.batch_size < 1:
        raise HydraoptError(f"--batch-size must be >= 1, got {args.batch_size}")
    requests = read_requests(args)  # bad input fails before the model loads
    from hydraopt.io.bundle import read_bundle_meta

    tasks = read_bundle_meta(args.bundle)["tasks"]
    unknown = sorted({t for t, _ in requests} - set(tasks))
    if unknown:
        raise HydraoptError(f"unknown task(s) {unknown}; the bundle has {tasks}")
    from tqdm.auto import tqdm

    from hydraopt.runtime import load_model

    runtime = load_model(args.bundle, args.base_model, threads=args.threads)
    outputs: list[str] = []
    bar = tqdm(total=len(requests), desc="generate", unit="prompt", disable=len(requests) < 2)
    with bar:
        for start in range(0, len(requests), args.batch_size):
            chunk = requests[start : start + args.batch_size]
            outputs += runtime.generate(
                [p for _, p in chunk],
                [t for t, _ in chunk],
                max_new_tokens=args.max_tokens,
                chat=not args.raw,
                batch_size=args.batch_size,
            )
            bar.update(len(chunk))
    if args.prompt is not None:
        print(outputs[0])
        return 0
    for (task, prompt), output in zip(requests, outputs, strict=True):
        sys.stdout.write(json.dumps({"task": task, "prompt": prompt, "output": output}) + "\n")
    return 0
