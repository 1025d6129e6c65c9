"""What an evaluation is asked to do and what it measured: typed configs and results.

:class:`EvalResults` is what :func:`hydraopt.eval.harness.evaluate` returns and what
:func:`hydraopt.eval.report.write_report` writes (``results.json``, the table, the plot).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

from hydraopt.errors import HydraoptError
from hydraopt.eval.tasks import Split

RESULTS_FORMAT = "hydraopt-eval"


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
