"""Task folders: their spec, their splits and the prompt the model sees.

A task folder (see ``docs/tasks.md``; eight real tasks ship in ``hydraopt/data/tasks``) holds ``task.json`` (id, instruction, metric, ...)
and ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl`` with one ``{"input", "target",
"references"}`` object a line. The model sees ``instruction + " " + input`` as the user turn of
its chat template, followed by the assistant header (``add_generation_prompt=True``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

Split = Literal["train", "val", "test"]

TASKS_ENV_VAR = "HYDRAOPT_TASKS"

# Generation caps per task: the 99th percentile of the token length of the test split's `target`
# plus one EOS token, under the SmolLM2-135M tokenizer, rounded up to a multiple of 8. The 99th
# rather than the 95th percentile so that a cap cuts at most ~1% of correct answers (a cut answer
# loses ROUGE / F1 for no reason), while a model that rambles still stops early enough to keep
# evaluation cheap. Reproduce with `measure_max_new_tokens` (tests/integration checks the table).
# Measured p95 / p99 / max (tokens incl. EOS): en-gc 35/52/84, en-sr 34/50/80, en-ts 48/61/70,
# en-ta 22/25/28, en-qa 12/21/42, de-qa 18/30/50, es-qa 19/32/42, zh-qa 32/42/93.
MAX_NEW_TOKENS: dict[str, int] = {
    "en-gc": 56,
    "en-sr": 56,
    "en-ts": 64,
    "en-ta": 32,
    "en-qa": 24,
    "de-qa": 32,
    "es-qa": 32,
    "zh-qa": 48,
}
# For a task outside the table and without "max_new_tokens" in its task.json.
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class TaskSpec:
    """What a task asks of the model and how it is scored.

    Attributes:
        id: Task id, e.g. ``"en-qa"`` (also the folder name).
        instruction: Text put before the input in the user turn.
        metric: Human-readable metric description from ``task.json``.
        max_new_tokens: Generation cap (see ``MAX_NEW_TOKENS`` for how it was chosen).
        language: Language code, e.g. ``"en"``.
        application: E.g. ``"question answering"``.
    """

    id: str
    instruction: str
    metric: str
    max_new_tokens: int
    language: str = ""
    application: str = ""


@dataclass(frozen=True)
class Example:
    """One line of a split.

    Attributes:
        input: Text appended to the instruction.
        target: The training label.
        references: All reference outputs for scoring (the best match counts).
    """

    input: str
    target: str
    references: tuple[str, ...]


def shipped_tasks_root() -> Path:
    """The eight tasks shipped inside the package (``hydraopt/data/tasks``, package data).

    Package data rather than a folder beside the checkout, so that ``pip install hydraopt`` finds
    them too; licenses and attributions are in ``ATTRIBUTION.md`` there.
    """
    return Path(__file__).resolve().parents[1] / "data" / "tasks"


def default_tasks_root() -> Path:
    """The tasks root when none is given: ``$HYDRAOPT_TASKS``, else :func:`shipped_tasks_root`."""
    env = os.environ.get(TASKS_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return shipped_tasks_root()


def resolve_task_dir(task: str | Path, tasks_root: str | Path | None = None) -> Path:
    """Find a task folder from a task id or a path.

    Args:
        task: A folder holding ``task.json``, or a task id looked up under the tasks root.
        tasks_root: Folder of task folders; defaults to :func:`default_tasks_root`.

    Returns:
        The task folder.

    Raises:
        FileNotFoundError: If no folder with a ``task.json`` is found.
    """
    as_path = Path(task).expanduser()
    if (as_path / "task.json").is_file():
        return as_path
    root = Path(tasks_root).expanduser() if tasks_root is not None else default_tasks_root()
    candidate = root / str(task)
    if (candidate / "task.json").is_file():
        return candidate
    raise FileNotFoundError(
        f"no task {str(task)!r}: neither it nor {candidate} is a folder with a task.json "
        f"(tasks under {root}: {', '.join(list_tasks(root)) or 'none'})"
    )


def list_tasks(root: str | Path | None = None) -> list[str]:
    """The task ids under ``root`` (default :func:`default_tasks_root`): folders with a task.json."""
    root = Path(root) if root is not None else default_tasks_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "task.json").is_file())


def load_task(task_dir: str | Path, *, max_new_tokens: int | None = None) -> TaskSpec:
    """Read ``task.json``.

    Args:
        task_dir: The task folder.
        max_new_tokens: Overrides the generation cap. Otherwise ``task.json``'s
            ``"max_new_tokens"``, else ``MAX_NEW_TOKENS[id]``, else ``DEFAULT_MAX_NEW_TOKENS``
            (with a warning).

    Returns:
        The task's spec.

    Raises:
        FileNotFoundError: If ``task.json`` is missing.
        ValueError: If a required field is missing or the cap is not positive.
    """
    path = Path(task_dir) / "task.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key in ("id", "instruction", "metric") if key not in raw]
    if missing:
        raise ValueError(f"{path} lacks required field(s) {missing}")
    task_id = str(raw["id"])
    if max_new_tokens is None:
        max_new_tokens = raw.get("max_new_tokens", MAX_NEW_TOKENS.get(task_id))
    if max_new_tokens is None:
        warnings.warn(
            f"task {task_id!r} has no generation cap; using {DEFAULT_MAX_NEW_TOKENS} "
            f'(add "max_new_tokens" to {path}, see measure_max_new_tokens)',
            stacklevel=2,
        )
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens} for {task_id!r}")
    return TaskSpec(
        id=task_id,
        instruction=str(raw["instruction"]),
        metric=str(raw["metric"]),
        max_new_tokens=int(max_new_tokens),
        language=str(raw.get("language", "")),
        application=str(raw.get("application", "")),
    )


def load_split(task_dir: str | Path, split: Split, limit: int | None = None) -> list[Example]:
    """Read the first ``limit`` examples of a split, in file order.

    Args:
        task_dir: The task folder.
        split: ``"train"``, ``"val"`` or ``"test"``.
        limit: Keep at most this many examples (``None``: all).

    Returns:
        The examples. ``references`` defaults to ``(target,)`` when a line has none.

    Raises:
        ValueError: For an unknown split, a negative limit, or a line without input/target.
    """
    if split not in get_args(Split):
        raise ValueError(f"split must be one of {get_args(Split)}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = Path(task_dir) / f"{split}.jsonl"
    examples: list[Example] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            raw = json.loads(line)
            if "input" not in raw or "target" not in raw:
                raise ValueError(f"{path}:{number} needs both 'input' and 'target'")
            references = tuple(raw.get("references") or (raw["target"],))
            examples.append(Example(raw["input"], raw["target"], references))
    return examples


def build_prompt(tokenizer: PreTrainedTokenizerBase, spec: TaskSpec, input: str) -> str:
    """The chat-formatted prompt for one input, ending with the assistant header.

    Args:
        tokenizer: A tokenizer with a chat template.
        spec: The task (its instruction is prepended).
        input: The example's input text.

    Returns:
        The prompt text; tokenize it with ``add_special_tokens=False``, since the template
        already holds every special token.
    """
    messages = [{"role": "user", "content": f"{spec.instruction} {input}"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, not str")
    return prompt


def measure_max_new_tokens(
    tokenizer: PreTrainedTokenizerBase,
    targets: Iterable[str],
    *,
    quantile: float = 0.99,
    multiple: int = 8,
) -> int:
    """A generation cap from target lengths: a quantile of (tokens + EOS), rounded up.

    Args:
        tokenizer: The model's tokenizer.
        targets: Reference outputs (the table uses the test split's ``target`` field).
        quantile: Which quantile of the lengths to cover, in (0, 1]; linear interpolation
            between order statistics, as ``numpy.percentile``'s default.
        multiple: Round the result up to a multiple of this.

    Returns:
        The cap in tokens.

    Raises:
        ValueError: If there are no targets or an argument is out of range.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    # +1: the EOS token that ends a finished answer also counts against the cap.
    lengths = sorted(
        len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in targets
    )
    if not lengths:
        raise ValueError("no targets to measure")
    position = quantile * (len(lengths) - 1)
    low = math.floor(position)
    high = min(low + 1, len(lengths) - 1)
    value = lengths[low] + (lengths[high] - lengths[low]) * (position - low)
    return max(multiple, math.ceil(value / multiple) * multiple)
