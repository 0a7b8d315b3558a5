"""Is a difference beyond noise? Paired bootstrap intervals and McNemar's test over one test set.

Every model is scored on the same examples, so the comparison is paired: each bootstrap resample draws one set of
example indices (with replacement, seeded) and scores every model on it. A model's 95% interval is the 2.5th to
97.5th percentile of its metric over the resamples; the difference of two models has its interval from the same
resamples, so what both get right or wrong together cancels. A difference is *beyond noise* when its interval
excludes 0. For accuracy, McNemar's exact test on the examples where exactly one of the two is right gives a
p-value as well.

Classification metrics are computed for all resamples at once from the class counts (numpy), so 1,000 resamples of
2,000 examples take milliseconds. Token classification resamples sentences: each sentence brings its counts (correct,
predicted and gold entities, correct words and words), and a resample's micro-averaged entity F1 and word accuracy
come from their sums (:func:`paired_count_comparison`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdistill.errors import InvalidArgumentError, ShapeMismatchError

__all__ = [
    "COUNT_COLUMNS",
    "bootstrap_indices",
    "classification_scores",
    "entity_count_scores",
    "mcnemar",
    "paired_comparison",
    "paired_count_comparison",
    "verdicts",
]

# what each sentence of a token-classification test set brings to a resample, in this order
COUNT_COLUMNS = ("correct", "predicted", "gold", "words_correct", "words")


def bootstrap_indices(count: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """``(resamples, count)`` example indices drawn with replacement from a seeded generator."""
    if count < 1:
        raise InvalidArgumentError(f"a bootstrap needs at least one example, got {count}")
    if resamples < 1:
        raise InvalidArgumentError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def classification_scores(
    predictions: np.ndarray, labels: np.ndarray, indices: np.ndarray, num_labels: int | None = None
) -> dict[str, np.ndarray]:
    """``accuracy`` and ``macro_f1`` of each row of ``indices`` (``(R, n)`` positions into the examples), as
    :func:`kdistill.eval.metrics.accuracy` and :func:`~kdistill.eval.metrics.macro_f1` compute them (a class in
    ``0..num_labels-1`` that neither side has counts with F1 0; None: the classes either side has)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ShapeMismatchError(
            f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must be one id per example"
        )
    picked_pred, picked_gold = predictions[indices], labels[indices]  # (R, n)
    accuracy = (picked_pred == picked_gold).mean(axis=1)
    classes = range(num_labels) if num_labels is not None else np.union1d(predictions, labels)
    f1s = []
    for label in classes:
        is_pred, is_gold = picked_pred == label, picked_gold == label
        true_positives = (is_pred & is_gold).sum(axis=1)
        denominator = is_pred.sum(axis=1) + is_gold.sum(axis=1)
        f1s.append(np.where(denominator > 0, 2 * true_positives / np.maximum(denominator, 1), 0.0))
    macro = np.mean(f1s, axis=0) if f1s else np.zeros(len(indices))
    return {"accuracy": accuracy.astype(np.float64), "macro_f1": macro.astype(np.float64)}


def entity_count_scores(counts: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Entity ``precision``, ``recall``, ``f1`` (micro-averaged, as :func:`kdistill.eval.metrics.entity_f1`) and
    word ``accuracy`` of each row of ``indices``, from the per-sentence ``counts`` ``(n, 5)`` of
    :data:`COUNT_COLUMNS`."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != len(COUNT_COLUMNS):
        raise ShapeMismatchError(f"counts must be (sentences, {len(COUNT_COLUMNS)}), got {tuple(counts.shape)}")
    sums = counts[indices].sum(axis=1)  # (R, 5)
    correct, predicted, gold, words_correct, words = sums.T
    precision = np.where(predicted > 0, correct / np.maximum(predicted, 1), 0.0)
    recall = np.where(gold > 0, correct / np.maximum(gold, 1), 0.0)
    total = precision + recall
    f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
    accuracy = np.where(words > 0, words_correct / np.maximum(words, 1), 0.0)
    return {"f1": f1, "precision": precision, "recall": recall, "accuracy": accuracy}


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """McNemar's exact test of two models' per-example correctness: ``only_a`` and ``only_b`` (the examples only
    one of them gets right) and the two-sided ``p_value`` of so uneven a split under a fair coin."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ShapeMismatchError(f"correctness vectors of {a.shape} and {b.shape} examples must pair up")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    # two-sided exact binomial: twice the smaller tail, in log space so large counts do not overflow
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))
               for i in range(k + 1)) if n else 1.0  # fmt: skip
    return {"only_a": float(only_a), "only_b": float(only_b), "p_value": min(1.0, 2 * tail) if n else 1.0}


def _interval(values: np.ndarray, level: float) -> list[float]:
    low = (1 - level) / 2
    return [float(np.quantile(values, low)), float(np.quantile(values, 1 - low))]


def paired_comparison(
    predictions: Mapping[str, Sequence[int]],
    labels: Sequence[int],
    *,
    num_labels: int | None = None,
    compare: Sequence[str] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Each model's metrics with their bootstrap intervals, and each pair's differences with theirs.

    Args:
        predictions: model name → its predicted class per example (all on the same examples, in one order).
        labels: the gold class per example.
        compare: the models whose pairs are compared (default: all of them).

    Returns:
        ``{"resamples", "seed", "level", "examples", "models": {name: {metric: {"value", "ci"}}},
        "pairs": [{"a", "b", "metric", "difference" (a − b), "ci", "beyond_noise", "mcnemar_p" (accuracy)}]}``.
    """
    gold = np.asarray(labels)
    preds = {name: np.asarray(values) for name, values in predictions.items()}
    indices = bootstrap_indices(len(gold), resamples, seed)
    everything = np.arange(len(gold))[None, :]
    point = {name: classification_scores(p, gold, everything, num_labels) for name, p in preds.items()}
    sampled = {name: classification_scores(p, gold, indices, num_labels) for name, p in preds.items()}

    def exact_test(a: str, b: str) -> float:
        return mcnemar(preds[a] == gold, preds[b] == gold)["p_value"]

    names = list(compare if compare is not None else preds)
    return _compared(point, sampled, names, resamples, seed, level, len(gold), {"accuracy": exact_test})


def paired_count_comparison(
    counts: Mapping[str, Any],
    *,
    compare: Sequence[str] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """:func:`paired_comparison` for token classification: ``counts`` maps each model to its per-sentence counts
    ``(n, 5)`` (:data:`COUNT_COLUMNS`, all models on the same sentences in one order); the metrics are entity F1,
    precision and recall and word accuracy, resampled by sentence."""
    arrays = {name: np.asarray(values, dtype=np.float64) for name, values in counts.items()}
    sizes = {array.shape[0] for array in arrays.values()}
    if len(sizes) != 1:
        raise ShapeMismatchError(f"every model must be counted on the same sentences, got {sorted(sizes)}")
    count = sizes.pop()
    indices = bootstrap_indices(count, resamples, seed)
    everything = np.arange(count)[None, :]
    point = {name: entity_count_scores(array, everything) for name, array in arrays.items()}
    sampled = {name: entity_count_scores(array, indices) for name, array in arrays.items()}
    names = list(compare if compare is not None else arrays)
    return _compared(point, sampled, names, resamples, seed, level, count, {})


def _compared(
    point: Mapping[str, Mapping[str, np.ndarray]],
    sampled: Mapping[str, Mapping[str, np.ndarray]],
    names: Sequence[str],
    resamples: int,
    seed: int,
    level: float,
    examples: int,
    exact_tests: Mapping[str, Any],
) -> dict[str, Any]:
    """The result of both comparisons: each model's intervals, each pair's differences (and exact tests)."""
    if not 0 < level < 1:
        raise InvalidArgumentError(f"level must be in (0, 1), got {level}")
    models = {
        name: {metric: {"value": float(point[name][metric][0]), "ci": _interval(values, level)}
               for metric, values in sampled[name].items()}
        for name in point
    }  # fmt: skip
    pairs = []
    for a, b in itertools.combinations(names, 2):
        for metric in sampled[a]:
            difference = float(point[a][metric][0] - point[b][metric][0])
            ci = _interval(sampled[a][metric] - sampled[b][metric], level)
            pair = {"a": a, "b": b, "metric": metric, "difference": difference, "ci": ci,
                    "beyond_noise": bool(ci[0] > 0 or ci[1] < 0)}  # fmt: skip
            if metric in exact_tests:
                pair["mcnemar_p"] = exact_tests[metric](a, b)
            pairs.append(pair)
    return {"resamples": resamples, "seed": seed, "level": level, "examples": examples, "models": models,
            "pairs": pairs}  # fmt: skip


def verdicts(comparison: Mapping[str, Any], metric: str = "accuracy") -> list[str]:
    """One sentence per compared pair on ``metric``: which is ahead, by how much, and whether beyond noise."""
    sentences = []
    level = round(100 * float(comparison.get("level", 0.95)))
    for pair in comparison.get("pairs", []):
        if pair["metric"] != metric:
            continue
        a, b, diff = pair["a"], pair["b"], pair["difference"]
        low, high = pair["ci"]
        p = f", McNemar p = {pair['mcnemar_p']:.3g}" if "mcnemar_p" in pair else ""
        spread = f"{metric} difference {diff:+.4f}, {level}% interval [{low:+.4f}, {high:+.4f}]{p}"
        if pair["beyond_noise"]:
            ahead, behind = (a, b) if diff > 0 else (b, a)
            sentences.append(f"{ahead} beats {behind} beyond noise ({spread})")
        else:
            sentences.append(f"{a} and {b} do not differ beyond noise ({spread})")
    return sentences
