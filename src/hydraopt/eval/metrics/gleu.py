"""GLEU of grammar correction, as JFLEG's ``eval/gleu.py`` (Napoles et al. 2015, 2016)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np

from hydraopt.errors import HydraoptError
from hydraopt.eval.metrics.corpus import check_corpus


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
    check_corpus(hypotheses, references)
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
