"""Evaluate systems (zero-shot, per-task LoRA, bundles) on tasks: the paper's Table 1 and Fig. 1.

:func:`evaluate` loads the base model once and, for every system and task, greedily decodes the
split and scores it with the task's metric. Generations are cached in JSONL files named by a
hash of everything that decides them (base model bytes, the system's weights, task, split,
generation cap), one line per example keyed by its index and the SHA-256 of its prompt; lines are
appended and flushed after every batch, so an interrupted run resumes where it stopped and a
rerun generates nothing. :func:`hydraopt.eval.report.write_report` writes ``results.json``, ``results.md`` (rows =
systems with S %, columns = tasks + Avg, as Table 1 of arXiv 2507.17706) and ``results.png``
(average score against storage %).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hydraopt.errors import HydraoptError
from hydraopt.eval.generate import applied_adapter, generate
from hydraopt.eval.metrics import get_metric
from hydraopt.eval.model import load_base_model, resolve_model_source
from hydraopt.eval.systems import System, check_unique_labels, file_sha256, text_sha256
from hydraopt.eval.tasks import (
    Example,
    Split,
    TaskSpec,
    build_prompt,
    load_split,
    load_task,
    resolve_task_dir,
)
from hydraopt.progress import Progress

# Bump when the meaning of a cached line changes (decoding, prompt format, post-processing), so
# old caches are ignored rather than mixed in.
CACHE_FORMAT = "hydraopt-generations-v1 greedy"
RESULTS_FORMAT = "hydraopt-eval"
MODEL_DTYPE = "float32"  # load_base_model's default; part of the model identity


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate on and how to decode.

    There is no seed: decoding is greedy, so outputs depend on weights and prompts only.

    Attributes:
        tasks: Task ids (looked up under ``tasks_root``) or task dirs.
        split: Split to decode.
        limit: First N examples of each split (``None``: all).
        batch_size: Prompts per generation batch (also the cache flush interval).
        max_new_tokens: Generation cap for every task; ``None`` keeps each task's own cap.
        threads: torch CPU threads when the base model is loaded here.
        tasks_root: Folder of task folders (``None``: the default root).
        model_path: Base model (``None``: the packaged SmolLM2-135M GGUF).
        progress: Show progress bars.
    """

    tasks: tuple[str, ...]
    split: Split = "test"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    threads: int | None = None
    tasks_root: Path | None = None
    model_path: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.tasks:
            raise HydraoptError("no tasks given; pass --tasks, e.g. --tasks en-qa en-ta")
        if len(set(self.tasks)) != len(self.tasks):
            raise HydraoptError(f"tasks must be unique, got {list(self.tasks)}")
        if self.split not in get_args(Split):
            raise HydraoptError(f"split must be one of {get_args(Split)}, got {self.split!r}")
        for name in ("limit", "batch_size", "max_new_tokens", "threads"):
            value = getattr(self, name)
            lowest = 0 if name == "limit" else 1
            if value is not None and value < lowest:
                raise HydraoptError(f"{name} must be >= {lowest}, got {value}")


@dataclass(frozen=True)
class TaskResult:
    """One system on one task.

    Attributes:
        task: Task id.
        metric: The metric's name (``task.json``'s ``"metric"``).
        scores: The metric's scores in 0..100, ``"primary"`` included.
        examples: Examples scored.
        generated: Examples decoded in this run (the rest came from the cache).
        new_tokens: Tokens decoded in this run, counted by re-tokenizing the answers (so the stop
            token is not counted).
        generate_seconds: Wall time of decoding (adapter set-up included).
        seconds: Wall time of the whole task (decoding and scoring).
        cache_file: The JSONL file holding the generations.
    """

    task: str
    metric: str
    scores: dict[str, float]
    examples: int
    generated: int = 0
    new_tokens: int = 0
    generate_seconds: float = 0.0
    seconds: float = 0.0
    cache_file: str = ""

    @property
    def cached(self) -> int:
        """Examples served from the cache."""
        return self.examples - self.generated


@dataclass(frozen=True)
class SystemResult:
    """One system on every task (a row of the table, a point of the plot).

    Attributes:
        label: Row label.
        method: Plot group (``"zero-shot"``, ``"lora"`` or the merge method).
        storage_percent: S %.
        tasks: Task id -> result, in the evaluation's task order.
        seconds: Wall time of the system over all tasks.
        system: The system's own description (paths, config).
    """

    label: str
    method: str
    storage_percent: float
    tasks: dict[str, TaskResult]
    seconds: float = 0.0
    system: dict[str, Any] = field(default_factory=dict)

    @property
    def average(self) -> float:
        """Mean of the tasks' primary scores, as the paper's Avg column."""
        return sum(r.scores["primary"] for r in self.tasks.values()) / len(self.tasks)


@dataclass(frozen=True)
class EvalResults:
    """Everything :func:`evaluate` measured.

    Attributes:
        config: The evaluation's config.
        tasks: Task ids, in column order.
        systems: One result per system, in row order.
        model: Base model path and SHA-256.
        seconds: Wall time of the whole evaluation, model loading included.
        model_seconds: Wall time of loading (or being handed) the model.
    """

    config: EvalConfig
    tasks: tuple[str, ...]
    systems: tuple[SystemResult, ...]
    model: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    model_seconds: float = 0.0

    @property
    def generated(self) -> int:
        """Examples decoded in this run over every system and task (0 on a fully cached rerun)."""
        return sum(r.generated for s in self.systems for r in s.tasks.values())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form; the file :func:`hydraopt.eval.report.write_report` writes."""
        new_tokens = sum(r.new_tokens for s in self.systems for r in s.tasks.values())
        decode_seconds = sum(
            r.generate_seconds for s in self.systems for r in s.tasks.values() if r.generated
        )
        return {
            "format": RESULTS_FORMAT,
            "config": {
                k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()
            },
            "model": self.model,
            "tasks": list(self.tasks),
            "systems": [
                {
                    **s.system,
                    "label": s.label,
                    "method": s.method,
                    "storage_percent": s.storage_percent,
                    "average": s.average,
                    "seconds": s.seconds,
                    "tasks": {t: {**asdict(r), "cached": r.cached} for t, r in s.tasks.items()},
                }
                for s in self.systems
            ],
            "seconds": self.seconds,
            "model_seconds": self.model_seconds,
            "generated_examples": self.generated,
            "generated_tokens": new_tokens,
            "generate_seconds": decode_seconds,
            "tokens_per_second": new_tokens / decode_seconds if decode_seconds else None,
        }


class GenerationCache:
    """Generations of one (model, system, task, split, settings), as an append-only JSONL file.

    Each line is ``{"index", "prompt_sha256", "output"}``. A line cut short by an interrupted
    write is skipped when reading, and the next append starts on a fresh line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._outputs: dict[tuple[int, str], str] = {}
        self._ends_cleanly = True
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            self._ends_cleanly = text == "" or text.endswith("\n")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                    key = (int(record["index"]), str(record["prompt_sha256"]))
                    self._outputs[key] = str(record["output"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a partial last line from an interrupted run

    def get(self, index: int, prompt_sha256: str) -> str | None:
        """The cached output of an example, or ``None``."""
        return self._outputs.get((index, prompt_sha256))

    def append(self, records: Sequence[tuple[int, str, str]]) -> None:
        """Add ``(index, prompt_sha256, output)`` records and flush them to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            if not self._ends_cleanly:
                f.write("\n")
                self._ends_cleanly = True
            for index, sha, output in records:
                line = {"index": index, "prompt_sha256": sha, "output": output}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                self._outputs[(index, sha)] = output
            f.flush()


@dataclass(frozen=True)
class _Task:
    spec: TaskSpec
    examples: list[Example]


def model_sha256(source_path: Path) -> str:
    """SHA-256 of a GGUF file, or of the sorted (name, file hash) pairs of a model dir."""
    if source_path.is_file():
        return file_sha256(source_path)
    files = sorted(
        p
        for pattern in ("*.json", "*.safetensors", "*.bin", "*.gguf", "*.model")
        for p in source_path.glob(pattern)
    )
    return text_sha256(*(f"{p.name}={file_sha256(p)}" for p in files))


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
