"""Question answering: SQuAD v1.1 token F1 and exact match, max over references.

en/de/es use SQuAD v1.1's normalisation; Chinese uses MLQA's evaluation (one token per
character).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

from hydraopt.errors import HydraoptError
from hydraopt.eval.metrics.corpus import check_corpus

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_WHITESPACE_LANGUAGES = frozenset({"en", "de", "es"})
_CJK_LANGUAGES = frozenset({"zh"})


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
    check_corpus(predictions, references)
    pairs = list(zip(predictions, references, strict=True))
    f1 = [100.0 * max(squad_f1(p, r, language) for r in refs) for p, refs in pairs]
    em = [100.0 * max(squad_exact_match(p, r, language) for r in refs) for p, refs in pairs]
    return {"f1": f1, "exact_match": em}
