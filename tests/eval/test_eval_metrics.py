"""Task metrics against hand-worked examples (the arithmetic is in the comments) and their edge cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.eval.metrics import (
    accuracy,
    entity_f1,
    get_entities,
    macro_f1,
    normalize_answer,
    perplexity,
    squad_scores,
)

# ---------------------------------------------------------------- classification


def test_accuracy_hand_example():
    # 0=0 ✓, 1≠2, 2=2 ✓, 1=1 ✓ → 3/4
    assert accuracy([0, 1, 2, 1], [0, 2, 2, 1]) == pytest.approx(0.75)


def test_accuracy_empty_is_zero_and_lengths_must_match():
    assert accuracy([], []) == 0.0
    with pytest.raises(ShapeMismatchError, match="3 predictions but 2 labels"):
        accuracy([0, 1, 2], [0, 1])


def test_macro_f1_hand_example():
    # predictions [0, 0, 1, 2], labels [0, 1, 1, 1]
    # class 0: tp 1, predicted 2, gold 1 → P 1/2, R 1   → F1 2/3
    # class 1: tp 1, predicted 1, gold 3 → P 1,   R 1/3 → F1 1/2
    # class 2: tp 0, predicted 1, gold 0 → F1 0
    # macro over the classes seen: (2/3 + 1/2 + 0) / 3 = 7/18
    assert macro_f1([0, 0, 1, 2], [0, 1, 1, 1]) == pytest.approx(7 / 18)
    # with num_labels=4, class 3 (never seen) counts as F1 0: (7/6) / 4 = 7/24
    assert macro_f1([0, 0, 1, 2], [0, 1, 1, 1], num_labels=4) == pytest.approx(7 / 24)


def test_macro_f1_perfect_and_edge_cases():
    assert macro_f1([2, 0, 1], [2, 0, 1]) == pytest.approx(1.0)
    assert macro_f1([], []) == 0.0
    with pytest.raises(InvalidArgumentError, match=r"class id 5 is outside 0..2"):
        macro_f1([5], [0], num_labels=3)
    with pytest.raises(InvalidArgumentError, match="num_labels"):
        macro_f1([0], [0], num_labels=0)
    with pytest.raises(ShapeMismatchError):
        macro_f1([0, 1], [0])


# ---------------------------------------------------------------- entities


def test_entity_f1_hand_example():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG"]]
    # gold: PER(0,0-1) LOC(0,3) ORG(1,0);  predicted: PER(0,0-1) ORG(0,3) ORG(1,0-1)
    # correct: PER only (the ORG of sentence 1 has the wrong span) → P = R = F1 = 1/3
    scores = entity_f1(gold, pred)
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3)
    assert (scores["num_gold"], scores["num_pred"]) == (3, 3)
    per_type = scores["per_type"]
    assert per_type["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert per_type["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted
    assert per_type["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # 2 predicted, 0 right


def test_entity_f1_partial_credit_hand_example():
    gold = [["B-PER", "O", "B-LOC", "I-LOC"]]
    pred = [["B-PER", "O", "B-LOC", "O"]]
    # gold PER(0) LOC(2-3); predicted PER(0) LOC(2): 1 correct of 2 predicted, of 2 gold → P = R = F1 = 1/2
    assert entity_f1(gold, pred)["f1"] == pytest.approx(0.5)
    pred = [["B-PER", "O", "O", "O"]]
    # 1 predicted, correct; 2 gold → P 1, R 1/2, F1 2/3
    scores = entity_f1(gold, pred)
    assert (scores["precision"], scores["recall"]) == (1.0, 0.5)
    assert scores["f1"] == pytest.approx(2 / 3)


def test_entities_are_read_like_seqeval_default():
    # An I- that does not continue an entity of its type starts one (seqeval's lenient default).
    assert get_entities(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]
    assert get_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    assert get_entities(["O", "I-PER", "B-PER"]) == [("PER", 1, 1), ("PER", 2, 2)]
    assert get_entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 0), ("PER", 1, 2)]
    assert get_entities(["B", "I", "O"]) == [("", 0, 1)]  # typeless tags
    assert get_entities([]) == []


def test_entity_f1_edge_cases():
    # gold entities, no predictions: recall 0, precision 0 (nothing predicted) → F1 0
    scores = entity_f1([["B-PER", "O"]], [["O", "O"]])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)
    # neither gold nor predicted entities: defined as 0.0 everywhere (not a perfect score)
    scores = entity_f1([["O", "O"]], [["O", "O"]])
    assert (scores["precision"], scores["recall"], scores["f1"], scores["per_type"]) == (0.0, 0.0, 0.0, {})
    assert entity_f1([], [])["f1"] == 0.0
    # predictions but no gold: precision 0
    assert entity_f1([["O"]], [["B-PER"]])["precision"] == 0.0
    with pytest.raises(ShapeMismatchError, match="sentence 1 has 2 gold tags but 1 predicted"):
        entity_f1([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(ShapeMismatchError, match="2 gold sentences but 1 predicted"):
        entity_f1([["O"], ["O"]], [["O"]])
    with pytest.raises(InvalidArgumentError, match=r"'E-PER' \(sentence 0, position 1\)"):
        entity_f1([["O", "E-PER"]], [["O", "O"]])


TAG = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(TAG, max_size=8), max_size=4))
def test_entity_f1_of_tags_with_themselves(sentences):
    scores = entity_f1(sentences, sentences)
    expected = 1.0 if scores["num_gold"] else 0.0
    assert scores["f1"] == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(st.lists(TAG, max_size=10))
def test_entities_round_trip_through_iob2(tags):
    entities = get_entities(tags)
    rebuilt = ["O"] * len(tags)
    for entity_type, start, end in entities:
        rebuilt[start] = f"B-{entity_type}"
        for position in range(start + 1, end + 1):
            rebuilt[position] = f"I-{entity_type}"
    assert get_entities(rebuilt) == entities
    assert all(start <= end for _, start, end in entities)


# ---------------------------------------------------------------- SQuAD


def test_squad_hand_example():
    predictions = ["The Eiffel Tower!", "in 1889", "Paris, France"]
    references = [["Eiffel Tower"], ["1889", "the year 1889"], ["Paris"]]
    # 1: "eiffel tower" == "eiffel tower" → EM 1, F1 1
    # 2: [in, 1889] vs [1889]: P 1/2, R 1 → F1 2/3; vs [year, 1889]: F1 1/2; best 2/3, EM 0
    # 3: [paris, france] vs [paris]: P 1/2, R 1 → F1 2/3, EM 0
    # EM = 100·1/3; F1 = 100·(1 + 2/3 + 2/3)/3 = 100·7/9
    scores = squad_scores(predictions, references)
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(700 / 9)


def test_squad_normalization_is_v1_1():
    assert normalize_answer("  The  Cat, an  ant & A banana. ") == "cat ant banana"  # articles as words only
    # both answers normalize to "": exact match 1, F1 0 (the official v1.1 script's behaviour)
    assert squad_scores(["the"], [["a"]]) == {"exact_match": 100.0, "f1": 0.0}


def test_squad_edge_cases():
    assert squad_scores([], []) == {"exact_match": 0.0, "f1": 0.0}
    with pytest.raises(InvalidArgumentError, match="question 0 needs a non-empty list"):
        squad_scores(["x"], [[]])
    with pytest.raises(InvalidArgumentError, match="question 0"):
        squad_scores(["x"], ["x"])  # a bare string is not a list of answers
    with pytest.raises(ShapeMismatchError):
        squad_scores(["x", "y"], [["x"]])


# ---------------------------------------------------------------- perplexity


def test_perplexity():
    # mean NLL log 4 per token → perplexity 4
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert perplexity(0.0, 3) == 1.0
    assert perplexity(1e6, 1) == math.inf
    for nll, tokens in ((1.0, 0), (-1.0, 3), (math.nan, 3), (1.0, 2.5)):
        with pytest.raises(InvalidArgumentError):
            perplexity(nll, tokens)
