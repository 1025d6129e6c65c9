"""Task-quality metrics of the HydraOpt evaluation (arXiv 2507.17706).

``METRICS`` maps the ``"metric"`` string of a task's ``task.json`` to a :class:`Metric`. Every
metric scores a corpus as ``metric.score(predictions, references, sources=..., language=...)``
and returns scores in 0..100 plus a ``"primary"`` entry holding the headline number (the key it
copies is ``metric.primary``). ``references[i]`` lists all references of example ``i``; an
example counts against its best-matching reference.

- QA: SQuAD v1.1 F1 / exact match, max over references. Chinese uses MLQA's evaluation.
- Summarisation, tone: ROUGE-L F1 (``rouge-score``, Porter stemming), best reference.
- Smart reply: "weighted ROUGE", the mean of ROUGE-1/2/L F1, best reference.
- Grammar correction: ERRANT span-correction F0.5 (as ``errant_compare``) and JFLEG's GLEU.

spaCy, ERRANT and ``rouge-score`` are imported inside the functions that use them, so importing
this package stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hydraopt.errors import HydraoptError
from hydraopt.eval.metrics.corpus import CorpusScorer, ExampleScorer
from hydraopt.eval.metrics.errant_f05 import (
    ERRANT_SPACY_MODEL,
    EditKey,
    EditSet,
    compare_edits,
    errant_corpus_counts,
    errant_fscore,
    extract_edits,
    load_errant_annotator,
    score_grammar_correction,
)
from hydraopt.eval.metrics.gleu import corpus_gleu, gleu_from_statistics, gleu_statistics
from hydraopt.eval.metrics.rouge import score_rouge_l_examples, score_weighted_rouge_examples
from hydraopt.eval.metrics.squad import (
    normalize_answer,
    score_qa_examples,
    squad_exact_match,
    squad_f1,
)

__all__ = [
    "ERRANT_SPACY_MODEL",
    "METRICS",
    "CorpusScorer",
    "EditKey",
    "EditSet",
    "ExampleScorer",
    "Metric",
    "compare_edits",
    "corpus_gleu",
    "errant_corpus_counts",
    "errant_fscore",
    "extract_edits",
    "get_metric",
    "gleu_from_statistics",
    "gleu_statistics",
    "load_errant_annotator",
    "normalize_answer",
    "score_grammar_correction",
    "score_qa_examples",
    "score_rouge_l_examples",
    "score_weighted_rouge_examples",
    "squad_exact_match",
    "squad_f1",
]


@dataclass(frozen=True)
class Metric:
    """A task-quality metric, registered under its ``task.json`` name.

    Attributes:
        name: The ``"metric"`` string of ``task.json``.
        primary: Key of the headline number in ``score``'s result (also under ``"primary"``).
        score: Corpus-level scores in 0..100.
        score_examples: Per-example scores whose mean is the corpus score, so a harness can cache
            them; ``None`` where the corpus score does not decompose (ERRANT's reference choice
            depends on the running corpus counts, GLEU sums n-gram counts over the corpus).
    """

    name: str
    primary: str
    score: CorpusScorer
    score_examples: ExampleScorer | None


def _mean_over_examples(score_examples: ExampleScorer, primary: str) -> CorpusScorer:
    """A corpus scorer that averages per-example scores, for metrics that decompose."""

    def score(
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
        *,
        sources: Sequence[str] | None = None,
        language: str = "en",
    ) -> dict[str, float]:
        per_example = score_examples(predictions, references, sources=sources, language=language)
        scores = {name: sum(values) / len(values) for name, values in per_example.items()}
        scores["primary"] = scores[primary]
        return scores

    return score


def _decomposable(name: str, primary: str, score_examples: ExampleScorer) -> Metric:
    return Metric(name, primary, _mean_over_examples(score_examples, primary), score_examples)


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        _decomposable("SQuAD F1 (max over references)", "f1", score_qa_examples),
        _decomposable("ROUGE-L (best over references)", "rougeL", score_rouge_l_examples),
        _decomposable(
            "weighted ROUGE (mean of ROUGE-1, ROUGE-2, ROUGE-L F1)",
            "weighted_rouge",
            score_weighted_rouge_examples,
        ),
        Metric(
            "F0.5 (ERRANT) and GLEU against all references",
            "f0.5",
            score_grammar_correction,
            None,
        ),
    )
}


def get_metric(name: str) -> Metric:
    """The registered metric for a ``task.json`` ``"metric"`` string.

    Raises:
        HydraoptError: If no metric has that name (the message lists those that do).
    """
    if name not in METRICS:
        raise HydraoptError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    return METRICS[name]
