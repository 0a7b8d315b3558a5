"""Task metrics as plain functions of predictions and gold labels: pure Python, no model and no transformers.

* :func:`accuracy`, :func:`macro_f1` — classification (one label per example or per token, flattened);
* :func:`entity_f1` — entity-level precision/recall/F1 for NER tags in the BIO (IOB2) scheme, as seqeval computes
  it in its default mode;
* :func:`squad_scores` — exact match and F1 of extractive QA answers, with the official SQuAD v1.1 normalization;
* :func:`perplexity` — from a summed negative log-likelihood and its token count.

Conventions for empty input, chosen so that an evaluation never divides by zero and never looks better than it is:
every score of an empty input is 0.0, a ratio whose denominator is 0 (precision with no predictions, recall with no
gold items) is 0.0, and so is an F1 whose precision and recall are both 0.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

from kdistill.errors import InvalidArgumentError, ShapeMismatchError

__all__ = ["accuracy", "entity_f1", "get_entities", "macro_f1", "normalize_answer", "perplexity", "squad_scores"]


def _check_same_length(predictions: Sequence[object], labels: Sequence[object], what: str) -> None:
    if len(predictions) != len(labels):
        raise ShapeMismatchError(f"{what}: {len(predictions)} predictions but {len(labels)} labels; they must pair up")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label.

    Args:
        predictions: predicted class ids, one per example (flatten token-level predictions first).
        labels: gold class ids, as many as ``predictions``.

    Returns:
        A fraction in [0, 1]; 0.0 for empty input.

    Raises:
        ShapeMismatchError: the two sequences differ in length.
    """
    _check_same_length(predictions, labels, "accuracy")
    correct = sum(int(p) == int(g) for p, g in zip(predictions, labels, strict=True))
    return _ratio(correct, len(labels))


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_labels: int | None = None) -> float:
    """Unweighted mean over classes of each class's F1 (one-vs-rest).

    Args:
        predictions: predicted class ids.
        labels: gold class ids, as many as ``predictions``.
        num_labels: the classes are ``0..num_labels-1``; a class that appears in neither sequence then counts with
            F1 0 (as scikit-learn's ``f1_score(..., labels=range(num_labels), average="macro")``). None averages over
            the classes that appear in either sequence.

    Returns:
        Macro F1 in [0, 1]; 0.0 for empty input (with ``num_labels=None``).

    Raises:
        ShapeMismatchError: the two sequences differ in length.
        InvalidArgumentError: ``num_labels < 1``, or an id outside ``0..num_labels-1``.
    """
    _check_same_length(predictions, labels, "macro_f1")
    predicted = [int(p) for p in predictions]
    gold = [int(g) for g in labels]
    if num_labels is not None:
        if num_labels < 1:
            raise InvalidArgumentError(f"num_labels must be >= 1, got {num_labels}")
        outside = [value for value in predicted + gold if not 0 <= value < num_labels]
        if outside:
            raise InvalidArgumentError(
                f"class id {outside[0]} is outside 0..{num_labels - 1} (num_labels={num_labels})"
            )
        classes = list(range(num_labels))
    else:
        classes = sorted(set(predicted) | set(gold))
    if not classes:
        return 0.0
    true_pos = Counter(p for p, g in zip(predicted, gold, strict=True) if p == g)
    pred_count, gold_count = Counter(predicted), Counter(gold)
    scores = [
        _f1(_ratio(true_pos[c], pred_count[c]), _ratio(true_pos[c], gold_count[c])) for c in classes
    ]  # one F1 per class
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- entities


def _split_tag(tag: str, sentence: int, position: int) -> tuple[str, str]:
    """``"B-PER"`` → ``("B", "PER")``; ``"O"`` → ``("O", "")``; a bare ``"B"``/``"I"`` has the empty type."""
    if tag == "O":
        return "O", ""
    prefix, _, entity_type = tag.partition("-")
    if prefix not in ("B", "I"):
        raise InvalidArgumentError(
            f"tag {tag!r} (sentence {sentence}, position {position}) is not in the BIO scheme: expected 'O', "
            "'B-<type>' or 'I-<type>'"
        )
    return prefix, entity_type


def get_entities(tags: Sequence[str], sentence: int = 0) -> list[tuple[str, int, int]]:
    """The entities of one sentence's BIO tags as ``(type, start, end)``, ``end`` inclusive.

    An entity starts at ``B-X``, or at ``I-X`` that does not continue an entity of type X (after ``O``, or after a
    different type) — seqeval's default, lenient reading; it continues over ``I-X`` and ends before anything else.

    Args:
        tags: the sentence's tags, e.g. ``["B-PER", "I-PER", "O"]``.
        sentence: index of the sentence, for error messages.

    Raises:
        InvalidArgumentError: a tag outside the BIO scheme (``E-``/``S-`` prefixes included).
    """
    entities: list[tuple[str, int, int]] = []
    current: tuple[str, int] | None = None  # (type, start) of the open entity
    for position, tag in enumerate(tags):
        prefix, entity_type = _split_tag(tag, sentence, position)
        continues = prefix == "I" and current is not None and current[0] == entity_type
        if current is not None and not continues:
            entities.append((current[0], current[1], position - 1))
            current = None
        if prefix != "O" and not continues:
            current = (entity_type, position)
    if current is not None:
        entities.append((current[0], current[1], len(tags) - 1))
    return entities


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    precision, recall = _ratio(correct, predicted), _ratio(correct, gold)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}


def entity_f1(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
    """Entity-level precision, recall and F1 (micro-averaged), strict: same type and same span.

    Entities are read from BIO (IOB2) tags by :func:`get_entities`; an entity counts as correct only when a gold
    entity has the same type, start and end. This is seqeval's ``classification_report`` in its default mode.

    Args:
        true_tags: gold tags, one list per sentence.
        pred_tags: predicted tags, same number of sentences and the same length per sentence.

    Returns:
        ``{"precision", "recall", "f1", "num_gold", "num_pred", "per_type": {type: {"precision", "recall", "f1",
        "support"}}}``. Precision is 0.0 when nothing is predicted, recall 0.0 when nothing is gold, so gold
        entities with no predictions give F1 0.0; when there are neither gold nor predicted entities every score is
        also 0.0 (there is nothing to be right about, and a perfect score would hide an empty evaluation set).

    Raises:
        ShapeMismatchError: the sentence counts, or a sentence's lengths, differ.
        InvalidArgumentError: a tag outside the BIO scheme.
    """
    if len(true_tags) != len(pred_tags):
        raise ShapeMismatchError(
            f"entity_f1: {len(true_tags)} gold sentences but {len(pred_tags)} predicted sentences"
        )
    gold: set[tuple[int, str, int, int]] = set()
    predicted: set[tuple[int, str, int, int]] = set()
    for index, (gold_sentence, pred_sentence) in enumerate(zip(true_tags, pred_tags, strict=True)):
        if len(gold_sentence) != len(pred_sentence):
            raise ShapeMismatchError(
                f"entity_f1: sentence {index} has {len(gold_sentence)} gold tags but {len(pred_sentence)} predicted"
            )
        gold.update((index, *entity) for entity in get_entities(gold_sentence, index))
        predicted.update((index, *entity) for entity in get_entities(pred_sentence, index))
    correct = gold & predicted
    per_type: dict[str, dict[str, float]] = {}
    for entity_type in sorted({entity[1] for entity in gold | predicted}):
        n_gold = sum(entity[1] == entity_type for entity in gold)
        scores = _prf(
            sum(entity[1] == entity_type for entity in correct),
            sum(entity[1] == entity_type for entity in predicted),
            n_gold,
        )
        per_type[entity_type] = {**scores, "support": n_gold}
    return {
        **_prf(len(correct), len(predicted), len(gold)),
        "num_gold": len(gold),
        "num_pred": len(predicted),
        "per_type": per_type,
    }


# ---------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalization: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _answer_f1(prediction: str, reference: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    reference_tokens = normalize_answer(reference).split()
    common = Counter(predicted_tokens) & Counter(reference_tokens)
    same = sum(common.values())
    if same == 0:  # as the official v1.1 script: two empty answers score F1 0 (but exact match 1)
        return 0.0
    return _f1(same / len(predicted_tokens), same / len(reference_tokens))


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Exact match and token F1 of extractive QA answers, in percent (the official SQuAD v1.1 evaluation).

    Both are computed on normalized answers (:func:`normalize_answer`), take the best over each question's reference
    answers, and are averaged over questions.

    Args:
        predictions: one predicted answer string per question.
        references: the gold answers of each question (at least one each).

    Returns:
        ``{"exact_match": EM, "f1": F1}`` in [0, 100]; both 0.0 for no questions.

    Raises:
        ShapeMismatchError: the numbers of predictions and of questions differ.
        InvalidArgumentError: a question without reference answers.
    """
    _check_same_length(predictions, references, "squad_scores")
    exact, f1 = 0.0, 0.0
    for index, (prediction, answers) in enumerate(zip(predictions, references, strict=True)):
        if isinstance(answers, str) or not answers:
            raise InvalidArgumentError(
                f"squad_scores: question {index} needs a non-empty list of reference answers, got {answers!r}"
            )
        normalized = normalize_answer(prediction)
        exact += max(float(normalized == normalize_answer(answer)) for answer in answers)
        f1 += max(_answer_f1(prediction, answer) for answer in answers)
    count = len(predictions)
    return {"exact_match": 100.0 * _ratio(exact, count), "f1": 100.0 * _ratio(f1, count)}


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(total_nll / tokens): the perplexity of a language model on ``tokens`` predicted tokens.

    Args:
        total_nll: the summed negative log-likelihood, in nats, over the counted tokens.
        tokens: how many tokens were predicted.

    Returns:
        The perplexity, >= 1; ``inf`` when the mean NLL overflows ``exp``.

    Raises:
        InvalidArgumentError: ``tokens < 1``, or a negative or non-finite ``total_nll``.
    """
    if int(tokens) != tokens or tokens < 1:
        raise InvalidArgumentError(f"perplexity needs tokens >= 1, got {tokens}")
    total_nll = float(total_nll)
    if not math.isfinite(total_nll) or total_nll < 0:
        raise InvalidArgumentError(f"perplexity needs a finite total_nll >= 0 (in nats), got {total_nll}")
    try:
        return math.exp(total_nll / tokens)
    except OverflowError:
        return math.inf
