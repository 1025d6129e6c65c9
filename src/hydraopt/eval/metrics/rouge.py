"""ROUGE-L F1 (summarisation, tone) and weighted ROUGE (smart reply), best reference.

``rouge-score`` is imported inside the function that uses it, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydraopt.errors import HydraoptError
from hydraopt.eval.metrics.corpus import check_corpus


def _rouge_best(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    language: str,
    rouge_types: tuple[str, ...],
) -> list[dict[str, float]]:
    """For each example, the F1 of each type against the reference with the best mean F1."""
    from rouge_score.rouge_scorer import RougeScorer

    if language != "en":
        # rouge-score's tokenizer keeps only [a-z0-9]; any other script would score 0.
        raise HydraoptError(f"ROUGE here tokenizes English only, got language {language!r}")
    check_corpus(predictions, references)
    # use_stemmer=True is ROUGE-1.5.5's "-m" (Porter stemming), the setting of the standard
    # summarisation evaluations (and of rouge-score's own README); without it "cats" != "cat".
    scorer = RougeScorer(list(rouge_types), use_stemmer=True)
    best: list[dict[str, float]] = []
    for prediction, refs in zip(predictions, references, strict=True):
        candidates = []
        for reference in refs:
            scores = scorer.score(reference, prediction)  # (target, prediction) order
            candidates.append({name: scores[name].fmeasure for name in rouge_types})
        # One reference for all types (so weighted ROUGE's parts come from the same reference);
        # the first of tied references wins, as in rouge-score's score_multi.
        best.append(max(candidates, key=lambda c: sum(c.values())))
    return best


def score_rouge_l_examples(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    sources: Sequence[str] | None = None,
    language: str = "en",
) -> dict[str, list[float]]:
    """Per-example ROUGE-L F1 against the best reference, in 0..100."""
    best = _rouge_best(predictions, references, language, ("rougeL",))
    return {"rougeL": [100.0 * b["rougeL"] for b in best]}


def score_weighted_rouge_examples(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    sources: Sequence[str] | None = None,
    language: str = "en",
) -> dict[str, list[float]]:
    """Per-example mean of ROUGE-1/2/L F1 and its parts, best reference, in 0..100."""
    types = ("rouge1", "rouge2", "rougeL")
    best = _rouge_best(predictions, references, language, types)
    result = {name: [100.0 * b[name] for b in best] for name in types}
    result["weighted_rouge"] = [100.0 * sum(b.values()) / len(types) for b in best]
    return result
