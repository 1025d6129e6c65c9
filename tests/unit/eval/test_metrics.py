"""Task-quality metrics, on pairs small enough to score by hand (the arithmetic is in comments)."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace
from typing import Any

import pytest

from hydraopt.errors import HydraoptError
from hydraopt.eval.metrics import (
    METRICS,
    compare_edits,
    corpus_gleu,
    errant_corpus_counts,
    errant_fscore,
    extract_edits,
    get_metric,
    gleu_from_statistics,
    gleu_statistics,
    load_errant_annotator,
    normalize_answer,
    score_grammar_correction,
    squad_exact_match,
    squad_f1,
)
from hydraopt.eval.tasks import shipped_tasks_root

QA = "SQuAD F1 (max over references)"
ROUGE_L = "ROUGE-L (best over references)"
WEIGHTED_ROUGE = "weighted ROUGE (mean of ROUGE-1, ROUGE-2, ROUGE-L F1)"
GRAMMAR = "F0.5 (ERRANT) and GLEU against all references"

# ------------------------------------------------------------------------------------ SQuAD --


def test_squad_f1_by_hand() -> None:
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]; overlap 2.
    # P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8.
    assert squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert squad_exact_match("the cat sat", "a cat sat down") == 0.0
    assert squad_exact_match("The cat, sat!", "cat sat") == 1.0


def test_squad_normalisation_is_v1_1() -> None:
    # lower -> drop ASCII punctuation -> drop a/an/the -> collapse whitespace.
    assert normalize_answer("The  Cat's, hat!") == "cats hat"
    # Only ASCII punctuation goes: the en dash stays, so "1989–90" is one token, as in SQuAD.
    assert normalize_answer("1989–90") == "1989–90"
    assert squad_f1("1989–90", "1989") == 0.0
    # v1.1 quirk: both sides normalise to empty -> F1 0 but exact match 1.
    assert squad_f1("the", "a") == 0.0
    assert squad_exact_match("the", "a") == 1.0


def test_chinese_is_scored_per_character_as_mlqa() -> None:
    # "北京大学" -> 北 京 大 学; "北京" -> 北 京; P = 2/4, R = 2/2, F1 = 2 * 0.5 / 1.5 = 2/3.
    assert squad_f1("北京大学", "北京", language="zh") == pytest.approx(2 / 3)
    # Whitespace tokens would make the whole answer one token and score 0.
    assert squad_f1("北京大学", "北京", language="en") == 0.0
    # Full-width punctuation goes; digits stay a run; CJK characters split.
    assert normalize_answer("“2015年”2月。", language="zh") == "2015 年 2 月"
    # No article removal for Chinese (MLQA).
    assert normalize_answer("The iPhone", language="zh") == "the iphone"


def test_unknown_qa_language_is_rejected() -> None:
    with pytest.raises(HydraoptError, match="language"):
        normalize_answer("x", language="fr")


def test_qa_corpus_is_mean_of_best_reference() -> None:
    metric = get_metric(QA)
    predictions = ["the cat sat", "Paris"]
    references = [["a cat sat down"], ["London", "paris."]]
    # Example 1: F1 0.8, EM 0. Example 2: best reference "paris." -> F1 1, EM 1.
    scores = metric.score(predictions, references)
    assert scores["f1"] == pytest.approx(100 * (0.8 + 1.0) / 2)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["primary"] == scores["f1"]
    per_example = metric.score_examples(predictions, references)  # type: ignore[misc]
    assert per_example["f1"] == pytest.approx([80.0, 100.0])


# ------------------------------------------------------------------------------------ ROUGE --


def test_rouge_l_by_hand_lcs() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5 of 6
    # tokens on each side: P = R = F = 5/6.
    scores = get_metric(ROUGE_L).score(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)
    assert scores["primary"] == scores["rougeL"]


def test_rouge_l_takes_best_reference() -> None:
    refs = ["a completely unrelated sentence", "the cat is on the mat"]
    for order in (refs, refs[::-1]):
        scores = get_metric(ROUGE_L).score(["the cat sat on the mat"], [order])
        assert scores["rougeL"] == pytest.approx(100 * 5 / 6)


def test_rouge_uses_porter_stemming() -> None:
    # Stemmed: [the, cat, were, run] vs [the, cat, was, run]: LCS 3 of 4 -> 0.75.
    # Unstemmed, "cats" != "cat" and "running" would still match: LCS 2 of 4 -> 0.5.
    scores = get_metric(ROUGE_L).score(["the cats were running"], [["the cat was running"]])
    assert scores["rougeL"] == pytest.approx(75.0)


def test_weighted_rouge_by_hand() -> None:
    # Unigrams: the x2, cat, on, mat shared -> R1 = 5/6. Bigrams: (the cat) (on the) (the mat)
    # shared of 5 -> R2 = 3/5. RL = 5/6. Weighted = (5/6 + 3/5 + 5/6) / 3.
    scores = get_metric(WEIGHTED_ROUGE).score(
        ["the cat sat on the mat"], [["the cat is on the mat"]]
    )
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5)
    assert scores["weighted_rouge"] == pytest.approx(100 * (5 / 6 + 3 / 5 + 5 / 6) / 3)
    assert scores["primary"] == scores["weighted_rouge"]


def test_weighted_rouge_parts_come_from_one_reference() -> None:
    # "red green blue pink" vs ref 1 "pink blue green red": R1 1, R2 0, RL 1/4 (sum 1.25);
    # vs ref 2 "red green gray black": R1 1/2, R2 1/3, RL 1/2 (sum 4/3) -> ref 2 wins whole.
    # Taking each part's own best would give (1 + 1/3 + 1/2) / 3 instead.
    scores = get_metric(WEIGHTED_ROUGE).score(
        ["red green blue pink"], [["pink blue green red", "red green gray black"]]
    )
    assert scores["rouge1"] == pytest.approx(50.0)
    assert scores["weighted_rouge"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_rouge_rejects_non_english() -> None:
    with pytest.raises(HydraoptError, match="English"):
        get_metric(ROUGE_L).score(["猫"], [["猫"]], language="zh")


# ------------------------------------------------------------------------------------- GLEU --

SRC_1, REF_1, HYP_1 = (
    "we was at the old house today",
    "we were at the old house today",
    "we are at the old house today",
)
SRC_2, REF_2, HYP_2 = "he go home now", "he goes home now", "he go home now"


def test_gleu_statistics_by_hand() -> None:
    # HYP_1 vs REF_1: n=1: 6 of 7 unigrams match ("are" does not); n=2: 4 of 6; n=3: 3 of 5;
    # n=4: 2 of 4. Source n-grams missing from the reference ("was", "we was", ...) are not in
    # the hypothesis, so nothing is subtracted.
    assert gleu_statistics(HYP_1.split(), SRC_1.split(), REF_1.split()) == [
        7, 7, 6, 7, 4, 6, 3, 5, 2, 4,
    ]  # fmt: skip
    # HYP_2 copies the source. n=1: 3 matches (he, home, now) minus 1 for keeping "go" -> 2;
    # n=2: 1 match (home now) minus 2 (he go, go home) -> max(-1, 0) = 0; n=3, n=4: 0.
    assert gleu_statistics(HYP_2.split(), SRC_2.split(), REF_2.split()) == [
        4, 4, 2, 4, 0, 3, 0, 2, 0, 1,
    ]  # fmt: skip


def test_corpus_gleu_by_hand() -> None:
    # Summed: c = r = 11; precisions 8/11, 4/9, 3/7, 2/5; brevity penalty 1.
    # GLEU = (8 * 4 * 3 * 2 / (11 * 9 * 7 * 5)) ** (1/4) = (192 / 3465) ** 0.25 ~ 0.4852.
    gleu = corpus_gleu([HYP_1, HYP_2], [SRC_1, SRC_2], [[REF_1], [REF_2]])
    assert gleu == pytest.approx(100 * (192 / 3465) ** 0.25)
    # Sentence 2 alone has a zero 2-gram numerator -> 0, unsmoothed as in gleu.py.
    assert corpus_gleu([HYP_2], [SRC_2], [[REF_2]]) == 0.0


def test_gleu_brevity_penalty() -> None:
    # "we were at the old house" vs REF_1: every n-gram matches (6/6, 5/5, 4/4, 3/3), but
    # c = 6 < r = 7 -> GLEU = exp(1 - 7/6).
    assert gleu_from_statistics([6, 7, 6, 6, 5, 5, 4, 4, 3, 3]) == pytest.approx(math.exp(-1 / 6))
    gleu = corpus_gleu(["we were at the old house"], [SRC_1], [[REF_1]])
    assert gleu == pytest.approx(100 * math.exp(-1 / 6))


def test_gleu_draws_a_reference_per_round_with_gleu_py_seeds() -> None:
    # Against REF_1 the sentence scores g0 = (144/840) ** 0.25; against itself g1 = 1. Round j
    # draws random.Random(j * 101).randint(0, 1) (gleu.py's seeds); the score is the mean.
    g0, g1 = (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25, 1.0
    picks = [random.Random(j * 101).randint(0, 1) for j in range(500)]
    expected = 100 * sum(g1 if pick else g0 for pick in picks) / 500
    gleu = corpus_gleu([HYP_1], [SRC_1], [[REF_1, HYP_1]])
    assert gleu == pytest.approx(expected)
    assert 100 * g0 < gleu < 100 * g1
    # Two copies of one reference give the single-reference score.
    assert corpus_gleu([HYP_1], [SRC_1], [[REF_1, REF_1]]) == pytest.approx(100 * g0)


# ---------------------------------------------------------------------- ERRANT, pure counts --


def test_compare_edits_by_hand() -> None:
    hypothesis = {(1, 2, "goes"): ["R:VERB:SVA"], (3, 4, "apple"): ["R:NOUN:NUM"]}
    reference = {(1, 2, "goes"): ["R:VERB:SVA"], (0, 0, "Then"): ["M:ADV"]}
    assert compare_edits(hypothesis, reference) == (1, 1, 1)


def test_errant_fscore_conventions() -> None:
    # P = 1/2, R = 1 -> F0.5 = 1.25 * 0.5 / (0.25 * 0.5 + 1) = 5/9.
    assert errant_fscore(1, 1, 0) == pytest.approx((0.5, 1.0, 5 / 9))
    # Empty denominators count as perfect, as errant_compare's computeFScore.
    assert errant_fscore(0, 0, 0) == (1.0, 1.0, 1.0)
    assert errant_fscore(0, 0, 3) == (1.0, 0.0, 0.0)


def test_reference_choice_uses_running_corpus_counts() -> None:
    # Sentence 1: 5 correct edits -> running counts (5, 0, 0).
    five = {(i, i + 1, "x"): ["R:OTHER"] for i in range(5)}
    # Sentence 2: hypothesis {e}; ref A = {e} + 5 more -> (1, 0, 5), own F0.5 0.5;
    # ref B = no edit -> (0, 1, 0), own F0.5 0. errant_compare scores the running totals:
    # A -> (6, 0, 5): P 1, R 6/11, F0.5 = 6/7 ~ 0.8571;
    # B -> (5, 1, 0): P 5/6, R 1, F0.5 = 1.25 * 5/6 / (0.25 * 5/6 + 1) = 25/29 ~ 0.8621 -> B.
    e = {(0, 1, "y"): ["R:OTHER"]}
    ref_a = {**e, **{(i, i + 1, "z"): ["R:OTHER"] for i in range(1, 6)}}
    counts = errant_corpus_counts([five, e], [[five], [ref_a, {}]])
    assert counts == (5, 1, 0)
    assert errant_fscore(*counts)[2] == pytest.approx(25 / 29)


def test_reference_ties_break_on_fewer_false_negatives() -> None:
    # Sentence 1: no hypothesis edit, one reference edit -> (0, 0, 1). Sentence 2: no
    # hypothesis edit; ref A has one edit -> (0, 0, 2), ref B none -> (0, 0, 1). Both give
    # F0.5 = 0 (no TP), so errant_compare falls back to fewer FN: B, though A comes first.
    counts = errant_corpus_counts(
        [{}, {}], [[{(0, 1, "a"): ["R:OTHER"]}], [{(2, 3, "b"): ["R:OTHER"]}, {}]]
    )
    assert counts == (0, 0, 1)


def test_extract_edits_drops_unk_and_keys_like_m2() -> None:
    # A stand-in annotator returning fixed edits: what matters here is the keying, not spaCy.
    def edit(start: int, end: int, tokens: list[str], error_type: str) -> SimpleNamespace:
        c_toks = [SimpleNamespace(text=t) for t in tokens]
        return SimpleNamespace(o_start=start, o_end=end, c_toks=c_toks, type=error_type)

    edits = [edit(0, 1, ["a", "b"], "R:OTHER"), edit(2, 3, ["x"], "UNK"), edit(4, 4, [], "U:DET")]
    fake = SimpleNamespace(parse=lambda text, tokenise: text, annotate=lambda orig, cor: edits)
    source = SimpleNamespace(text="the source ")
    # UNK edits cannot be corrections (errant_compare drops them); tokens join with one space.
    assert extract_edits(fake, source, "a changed text") == {  # type: ignore[arg-type]
        (0, 1, "a b"): ["R:OTHER"],
        (4, 4, ""): ["U:DET"],
    }
    # Text equal to the source is errant's "noop": no edit.
    assert extract_edits(fake, source, "the source") == {}  # type: ignore[arg-type]


# ----------------------------------------------------------------------- ERRANT with spaCy --


@pytest.fixture(scope="module")
def annotator() -> Any:  # errant ships no type stubs
    return load_errant_annotator()


def test_extract_edits(annotator: Any) -> None:
    source = annotator.parse("He go to school.", True)
    assert extract_edits(annotator, source, "He goes to the school.") == {
        (1, 2, "goes"): ["R:VERB:SVA"],
        (3, 3, "the"): ["M:DET"],
    }
    assert extract_edits(annotator, source, "He go to school.") == {}


def test_errant_f05_by_hand(annotator: Any) -> None:
    sources = ["He go to school.", "She like apples.", "This is fine."]
    # Whitespace is collapsed first; otherwise spaCy makes "\n" and " " tokens, i.e. edits.
    predictions = ["He goes\nto  school.", "She like apple.", "This is fine."]
    references = [
        ["He goes to the school."],
        ["She likes apples."],
        ["This is good.", "This is fine."],
    ]
    # 1: hyp {go->goes}, ref {go->goes, +the}: TP 1, FP 0, FN 1.
    # 2: hyp {apples->apple}, ref {like->likes}: TP 0, FP 1, FN 1.   Running: (1, 1, 2).
    # 3: no hyp edit. Ref "good": (1, 1, 3), F0.5 0.4167; ref "fine": (1, 1, 2), F0.5 0.4545.
    # Total (1, 1, 2): P 1/2, R 1/3, F0.5 = 1.25 * 1/6 / (0.25 * 1/2 + 1/3) = 5/11.
    scores = score_grammar_correction(predictions, references, sources=sources, annotator=annotator)
    assert scores["precision"] == pytest.approx(50.0)
    assert scores["recall"] == pytest.approx(100 / 3)
    assert scores["f0.5"] == pytest.approx(100 * 5 / 11)
    assert scores["primary"] == scores["f0.5"]
    # GLEU on the same (whitespace-collapsed) text.
    collapsed = [" ".join(p.split()) for p in predictions]
    assert scores["gleu"] == pytest.approx(corpus_gleu(collapsed, sources, references))


def test_grammar_correction_needs_sources() -> None:
    with pytest.raises(HydraoptError, match="source"):
        get_metric(GRAMMAR).score(["a"], [["a"]])


# --------------------------------------------------------------------------------- registry --


def test_registry_names_and_primaries() -> None:
    assert {name: metric.primary for name, metric in METRICS.items()} == {
        QA: "f1",
        ROUGE_L: "rougeL",
        WEIGHTED_ROUGE: "weighted_rouge",
        GRAMMAR: "f0.5",
    }
    with pytest.raises(HydraoptError, match="unknown metric"):
        get_metric("BLEU")


def test_every_shipped_task_metric_is_registered() -> None:
    task_files = sorted(shipped_tasks_root().glob("*/task.json"))
    assert len(task_files) == 8
    for path in task_files:
        assert json.loads(path.read_text(encoding="utf-8"))["metric"] in METRICS, path


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(HydraoptError, match="predictions"):
        get_metric(QA).score(["a", "b"], [["a"]])
    with pytest.raises(HydraoptError, match="no reference"):
        get_metric(QA).score(["a"], [[]])
