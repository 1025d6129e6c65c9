"""The contract every metric scores a corpus under, and the check of its inputs.

``references[i]`` lists all references of example ``i``; a scorer returns scores in 0..100.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from hydraopt.errors import HydraoptError


class CorpusScorer(Protocol):
    """Scores a corpus; ``sources`` are the task inputs (needed by grammar correction only)."""

    def __call__(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
        *,
        sources: Sequence[str] | None = None,
        language: str = "en",
    ) -> dict[str, float]: ...


class ExampleScorer(Protocol):
    """Scores each example on its own: ``{name: [score of example 0, ...]}``, in 0..100."""

    def __call__(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
        *,
        sources: Sequence[str] | None = None,
        language: str = "en",
    ) -> dict[str, list[float]]: ...


def check_corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise unless there is one non-empty reference list per prediction, and some example."""
    if len(predictions) != len(references):
        raise HydraoptError(
            f"{len(predictions)} predictions but {len(references)} reference lists; "
            "give one reference list per prediction"
        )
    if not predictions:
        raise HydraoptError("no examples to score")
    empty = [i for i, refs in enumerate(references) if len(refs) == 0]
    if empty:
        raise HydraoptError(f"examples {empty[:5]} have no reference")
