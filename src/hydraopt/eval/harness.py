"""Evaluate systems (zero-shot, per-task LoRA, bundles) on tasks: the paper's Table 1 and Fig. 1.

:func:`evaluate` loads the base model once and, for every system and task, greedily decodes the
split and scores it with the task's metric. Generations are cached
(:mod:`~hydraopt.eval.generation_cache`), so an interrupted run resumes where it stopped and a
rerun generates nothing. The config and results are typed (:mod:`~hydraopt.eval.results`);
:func:`hydraopt.eval.report.write_report` writes ``results.json``, ``results.md`` (rows = systems
with S %, columns = tasks + Avg, as Table 1 of arXiv 2507.17706) and ``results.png`` (average
score against storage %).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hydraopt.errors import HydraoptError
from hydraopt.eval.generate import applied_adapter, generate
from hydraopt.eval.generation_cache import CACHE_FORMAT, GenerationCache, model_sha256
from hydraopt.eval.metrics import get_metric
from hydraopt.eval.model import load_base_model, resolve_model_source
from hydraopt.eval.results import EvalConfig, EvalResults, SystemResult, TaskResult
from hydraopt.eval.systems import System, check_unique_labels, text_sha256
from hydraopt.eval.tasks import (
    Example,
    TaskSpec,
    build_prompt,
    load_split,
    load_task,
    resolve_task_dir,
)
from hydraopt.progress import Progress

MODEL_DTYPE = "float32"  # load_base_model's default; part of the model identity


@dataclass(frozen=True)
class _Task:
    spec: TaskSpec
    examples: list[Example]


def evaluate(
    systems: Sequence[System],
    config: EvalConfig,
    *,
    cache_dir: str | Path,
    model: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
) -> EvalResults:
    """Decode and score every task of ``config`` under every system.

    Args:
        systems: Systems to evaluate, in row order.
        config: Tasks, split, limit and decoding settings.
        cache_dir: Where generations are cached (created if missing).
        model: ``(model, tokenizer)`` already loaded from ``config.model_path``, to skip loading;
            the cache is keyed on the bytes at ``config.model_path`` either way.

    Returns:
        Scores, counts and timings per system and task.

    Raises:
        HydraoptError: For an unknown task or metric, an empty split, a system lacking a task,
            or two systems with one label; all checked before the model is loaded.
    """
    start = time.perf_counter()
    check_unique_labels(systems)
    tasks = {task: _load_task(task, config) for task in config.tasks}
    for system in systems:
        system.check_tasks(tasks)
    for task in tasks.values():
        get_metric(task.spec.metric)
    try:
        model_file = resolve_model_source(config.model_path).path
    except FileNotFoundError as e:
        raise HydraoptError(str(e)) from e
    model_id = text_sha256(model_sha256(model_file), MODEL_DTYPE)
    if model is None:
        model = load_base_model(config.model_path, threads=config.threads)
    model_seconds = time.perf_counter() - start
    rows = []
    for system in systems:
        system_start = time.perf_counter()
        results = {
            task_id: _run_task(system, task_id, task, model, model_id, config, Path(cache_dir))
            for task_id, task in tasks.items()
        }
        rows.append(
            SystemResult(
                label=system.label,
                method=system.method,
                storage_percent=system.storage_percent,
                tasks=results,
                seconds=time.perf_counter() - system_start,
                system=system.describe(),
            )
        )
    return EvalResults(
        config=config,
        tasks=tuple(tasks),
        systems=tuple(rows),
        model={"path": str(model_file), "sha256": model_id},
        seconds=time.perf_counter() - start,
        model_seconds=model_seconds,
    )


def _load_task(task: str, config: EvalConfig) -> _Task:
    try:
        task_dir = resolve_task_dir(task, config.tasks_root)
    except FileNotFoundError as e:
        raise HydraoptError(str(e)) from e
    spec = load_task(task_dir, max_new_tokens=config.max_new_tokens)
    examples = load_split(task_dir, config.split, config.limit)
    if not examples:
        raise HydraoptError(f"task {task!r} has no {config.split} examples to evaluate (--limit?)")
    return _Task(spec, examples)


def _run_task(
    system: System,
    task_id: str,
    task: _Task,
    model: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    model_id: str,
    config: EvalConfig,
    cache_dir: Path,
) -> TaskResult:
    """Decode what the cache lacks, then score the whole split."""
    start = time.perf_counter()
    base, tokenizer = model
    spec = task.spec
    key = text_sha256(
        CACHE_FORMAT,
        model_id,
        system.cache_id(task_id),
        spec.id,
        config.split,
        str(spec.max_new_tokens),
    )
    cache = GenerationCache(cache_dir / spec.id / f"{config.split}-{key[:32]}.jsonl")
    prompts = [build_prompt(tokenizer, spec, ex.input) for ex in task.examples]
    shas = [text_sha256(p) for p in prompts]
    missing = [i for i, sha in enumerate(shas) if cache.get(i, sha) is None]
    new_tokens = 0
    decode_start = time.perf_counter()
    if missing:
        lengths = {
            i: len(tokenizer(prompts[i], add_special_tokens=False)["input_ids"]) for i in missing
        }
        # Longest first across the whole split, so each batch holds similar lengths.
        order = sorted(missing, key=lambda i: (-lengths[i], i))
        with (
            applied_adapter(base, system.adapter(task_id)) as adapted,
            Progress(
                len(order), f"{system.label} | {spec.id}", "example", enabled=config.progress
            ) as bar,
        ):
            for rows in _chunks(order, config.batch_size):
                outputs = generate(
                    cast(PreTrainedModel, adapted),
                    tokenizer,
                    [prompts[i] for i in rows],
                    spec.max_new_tokens,
                    batch_size=config.batch_size,
                    progress=False,
                )
                cache.append([(i, shas[i], out) for i, out in zip(rows, outputs, strict=True)])
                new_tokens += sum(
                    len(tokenizer(out, add_special_tokens=False)["input_ids"]) for out in outputs
                )
                bar.update(len(rows))
    generate_seconds = time.perf_counter() - decode_start
    predictions = [cache.get(i, sha) or "" for i, sha in enumerate(shas)]
    scores = get_metric(spec.metric).score(
        predictions,
        [list(ex.references) for ex in task.examples],
        sources=[ex.input for ex in task.examples],
        language=spec.language or "en",
    )
    return TaskResult(
        task=task_id,
        metric=spec.metric,
        scores=scores,
        examples=len(prompts),
        generated=len(missing),
        new_tokens=new_tokens,
        generate_seconds=generate_seconds,
        seconds=time.perf_counter() - start,
        cache_file=str(cache.path),
    )


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
