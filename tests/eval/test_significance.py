"""Paired bootstrap intervals and McNemar's test, against references written here (float64, exact fractions)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from kdistill.eval.metrics import accuracy, entity_f1, get_entities, macro_f1
from kdistill.eval.significance import (
    bootstrap_indices,
    classification_scores,
    entity_count_scores,
    mcnemar,
    paired_comparison,
    paired_count_comparison,
    verdicts,
)


def _models(n: int = 400, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 3, n)

    def right_with(p: float) -> np.ndarray:
        wrong = (gold + rng.integers(1, 3, n)) % 3
        return np.where(rng.random(n) < p, gold, wrong)

    return gold, {"strong": right_with(0.9), "weak": right_with(0.6), "twin": right_with(0.9)}


def test_vectorized_scores_equal_the_metrics_on_each_resample():
    gold, models = _models(200)
    indices = bootstrap_indices(len(gold), resamples=6, seed=3)
    scores = classification_scores(models["weak"], gold, indices, num_labels=4)  # class 3 never occurs: F1 0
    for row, picked in enumerate(indices):
        predicted, labels = models["weak"][picked].tolist(), gold[picked].tolist()
        assert scores["accuracy"][row] == pytest.approx(accuracy(predicted, labels), abs=1e-12)
        assert scores["macro_f1"][row] == pytest.approx(macro_f1(predicted, labels, num_labels=4), abs=1e-12)
    unnamed = classification_scores(models["weak"], gold, indices[:1])
    assert unnamed["macro_f1"][0] == pytest.approx(macro_f1(models["weak"][indices[0]].tolist(),
                                                             gold[indices[0]].tolist()), abs=1e-12)  # fmt: skip


def test_bootstrap_indices_are_seeded():
    assert np.array_equal(bootstrap_indices(50, 10, seed=1), bootstrap_indices(50, 10, seed=1))
    assert not np.array_equal(bootstrap_indices(50, 10, seed=1), bootstrap_indices(50, 10, seed=2))
    assert bootstrap_indices(50, 10).shape == (10, 50)


@pytest.mark.parametrize(("only_a", "only_b"), [(0, 0), (3, 0), (7, 2), (40, 25), (600, 540)])
def test_mcnemar_is_the_exact_two_sided_binomial_test(only_a, only_b):
    both = 11
    a = np.array([True] * only_a + [False] * only_b + [True] * both)
    b = np.array([False] * only_a + [True] * only_b + [True] * both)
    n, k = only_a + only_b, min(only_a, only_b)
    expected = min(Fraction(1), 2 * sum(Fraction(math.comb(n, i), 2**n) for i in range(k + 1))) if n else 1
    result = mcnemar(a, b)
    assert (result["only_a"], result["only_b"]) == (only_a, only_b)
    assert result["p_value"] == pytest.approx(float(expected), rel=1e-9, abs=1e-300)


def test_paired_intervals_tell_a_real_difference_from_noise():
    gold, models = _models(400)
    result = paired_comparison(models, gold, num_labels=3, resamples=500, seed=0)
    for name, prediction in models.items():
        value = result["models"][name]["accuracy"]["value"]
        low, high = result["models"][name]["accuracy"]["ci"]
        assert value == pytest.approx(float(np.mean(prediction == gold)))
        assert low < value < high and high - low < 0.12  # ±2 standard errors of 400 examples, about ±0.03-0.05
    pairs = {(p["a"], p["b"], p["metric"]): p for p in result["pairs"]}
    real = pairs["strong", "weak", "accuracy"]
    assert real["beyond_noise"] and real["ci"][0] > 0 and real["mcnemar_p"] < 1e-6
    twins = pairs["strong", "twin", "accuracy"]  # the same quality, drawn twice: no verdict
    assert not twins["beyond_noise"] and twins["ci"][0] < 0 < twins["ci"][1] and twins["mcnemar_p"] > 0.01
    same = paired_comparison({"a": models["weak"], "b": models["weak"].copy()}, gold, resamples=50)
    assert same["pairs"][0]["ci"] == [0.0, 0.0] and same["pairs"][0]["mcnemar_p"] == 1.0
    words = verdicts(result)
    assert any(w.startswith("strong beats weak beyond noise") for w in words)
    assert any(w.startswith("strong and twin do not differ beyond noise") for w in words)
    assert paired_comparison(models, gold, resamples=500, seed=0) == paired_comparison(
        models, gold, resamples=500, seed=0
    )  # seeded: the same intervals every run


def _tagged(n: int, p_right: float, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Gold BIO sentences and predictions that keep each gold tag with probability ``p_right``."""
    rng = np.random.default_rng(seed)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC"]
    gold = [[str(t) for t in rng.choice(tags, int(rng.integers(3, 9)))] for _ in range(n)]
    pred = [[t if rng.random() < p_right else str(rng.choice(tags)) for t in sentence] for sentence in gold]
    return gold, pred


def _counts(gold: list[list[str]], pred: list[list[str]]) -> np.ndarray:
    rows = []
    for g, p in zip(gold, pred, strict=True):
        ge, pe = set(get_entities(g)), set(get_entities(p))
        rows.append([len(ge & pe), len(pe), len(ge), sum(a == b for a, b in zip(g, p, strict=True)), len(g)])
    return np.array(rows)


def test_entity_scores_from_sentence_counts_equal_entity_f1_on_each_resample():
    gold, pred = _tagged(60, 0.8, seed=1)
    counts = _counts(gold, pred)
    indices = bootstrap_indices(len(gold), resamples=5, seed=2)
    scores = entity_count_scores(counts, indices)
    for row, picked in enumerate(indices):
        expected = entity_f1([gold[i] for i in picked], [pred[i] for i in picked])  # sentences renumbered
        words = [(a, b) for i in picked for a, b in zip(gold[i], pred[i], strict=True)]
        assert scores["f1"][row] == pytest.approx(expected["f1"], abs=1e-12)
        assert scores["precision"][row] == pytest.approx(expected["precision"], abs=1e-12)
        assert scores["accuracy"][row] == pytest.approx(sum(a == b for a, b in words) / len(words), abs=1e-12)


def test_paired_count_comparison_tells_a_better_tagger_from_noise():
    gold, strong = _tagged(300, 0.95, seed=3)
    _, weak = _tagged(300, 0.6, seed=3)
    twin = [[t if np.random.default_rng(i).random() < 0.95 else "O" for t in g] for i, g in enumerate(gold)]
    result = paired_count_comparison(
        {"strong": _counts(gold, strong), "weak": _counts(gold, weak), "twin": _counts(gold, twin)}, seed=0
    )
    assert result["models"]["strong"]["f1"]["value"] == pytest.approx(entity_f1(gold, strong)["f1"])
    pairs = {(p["a"], p["b"], p["metric"]): p for p in result["pairs"]}
    assert pairs[("strong", "weak", "f1")]["beyond_noise"] and pairs[("strong", "weak", "f1")]["ci"][0] > 0
    assert "mcnemar_p" not in pairs[("strong", "weak", "accuracy")]
    low, high = result["models"]["strong"]["f1"]["ci"]
    assert low < result["models"]["strong"]["f1"]["value"] < high
    assert any("beats" in line for line in verdicts(result, "f1"))
