"""The generation cache: greedy outputs kept per (model, system, task, split, settings).

Generations are cached in JSONL files named by a hash of everything that decides them (base
model bytes, the system's weights, task, split, generation cap), one line per example keyed by
its index and the SHA-256 of its prompt; lines are appended and flushed after every batch, so an
interrupted run resumes where it stopped and a rerun generates nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from hydraopt.eval.systems import file_sha256, text_sha256

# Bump when the meaning of a cached line changes (decoding, prompt format, post-processing), so
# old caches are ignored rather than mixed in.
CACHE_FORMAT = "hydraopt-generations-v1 greedy"


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
