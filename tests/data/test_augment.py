"""data.augment: the rule-based operators (mask, replace, n-gram window), embedding neighbours and masked-LM
replacements against references computed here, paraphrases from a local causal LM, the cache, and runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_support import save_tiny_bert, sentiment_rows, write_csv, write_tokenizer

from conftest import make_tiny_chat_tokenizer, make_tiny_llama
from kdistill.config import load_config
from kdistill.data.augment import RuleAugmentation, augment_words, embedding_neighbours, neighbour_replacer
from kdistill.errors import InvalidArgumentError
from kdistill.runs.augment import mlm_replacer
from kdistill.runs.parts import build_parts

ROWS = [s.split() for s in ["the movie was very good", "i hate this awful food", "so sad", "great"]]


def test_operators_are_seeded_and_each_copy_is_new():
    spec = RuleAugmentation(p_mask=0.3, p_replace=0.0, p_ngram=0.5, ngram_range=(2, 3))
    first = augment_words(ROWS, 3, spec, None, seed=7)
    assert first == augment_words(ROWS, 3, spec, None, seed=7)
    assert first != augment_words(ROWS, 3, spec, None, seed=8)
    for index in range(len(ROWS)):
        copies = [tuple(words) for i, words in first if i == index]
        assert len(copies) <= 3 and len(set(copies)) == len(copies)  # distinct
        assert tuple(ROWS[index]) not in copies  # never the source itself
        for words in copies:
            source = ROWS[index]
            # each copy is a window of the source with some words masked
            assert any(
                all(w in ("[MASK]", source[start + j]) for j, w in enumerate(words))
                for start in range(len(source) - len(words) + 1)
            )


def test_masking_everything_and_ngram_lengths():
    spec = RuleAugmentation(p_mask=1.0, p_replace=0.0, p_ngram=0.0)
    made = augment_words(ROWS, 2, spec, None, seed=0)
    assert [words for _, words in made] == [["[MASK]"] * len(r) for r in ROWS]  # one distinct copy each
    spec = RuleAugmentation(p_mask=0.0, p_replace=0.0, p_ngram=1.0, ngram_range=(2, 3))
    for index, words in augment_words(ROWS, 4, spec, None, seed=1):
        assert 2 <= len(words) <= 3 and " ".join(words) in " ".join(ROWS[index])


def test_replacement_takes_one_of_the_neighbours():
    neighbours = {"good": ["fine", "nice"], "awful": ["bad"]}
    spec = RuleAugmentation(p_mask=0.0, p_replace=1.0, p_ngram=0.0)
    made = dict(augment_words(ROWS[:2], 1, spec, neighbour_replacer(neighbours, 0), seed=0))
    assert made[0][:4] == ROWS[0][:4] and made[0][4] in ("fine", "nice")
    assert made[1] == ["i", "hate", "this", "bad", "food"]


def test_embedding_neighbours_are_the_nearest_by_cosine():
    vocab = {w: i for i, w in enumerate(["[PAD]", "good", "great", "bad", "awful", "##s", "movie", "!", "fine"])}
    torch.manual_seed(0)
    weight = torch.randn(len(vocab), 6)
    got = embedding_neighbours(vocab, weight, ["Good", "bad", "nothing"], k=3)
    words = [w for w in vocab if w.isalpha()]
    table = torch.nn.functional.normalize(weight.double(), dim=-1)
    for query in ("good", "bad"):
        scores = {w: float(table[vocab[query]] @ table[vocab[w]]) for w in words if w != query}
        assert got[query] == sorted(scores, key=scores.get, reverse=True)[:3]
    assert set(got) == {"good", "bad"}


def test_mlm_replacements_are_among_the_heads_top_predictions(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = write_tokenizer(tmp_path / "mlm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "mlm")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32)).eval()  # fmt: skip
    replace = mlm_replacer(model, tokenizer, seed=0, k=2)
    rows, positions = [["the", "movie", "was", "good"]], [[1, 3]]
    got = replace(rows, positions)[0]
    masked = tokenizer([["the", "[MASK]", "was", "[MASK]"]], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**masked).logits[0]
    vocab = tokenizer.get_vocab()
    inverse = {i: t for t, i in vocab.items()}
    for slot, token_index in ((0, 2), (1, 4)):  # [CLS] the [MASK] was [MASK]
        order = [inverse[i] for i in logits[token_index].argsort(descending=True).tolist() if inverse[i].isalpha()]
        top = [w for w in order if w != rows[0][positions[0][slot]]][:2]
        assert got[slot] in top


def _config(tmp_path: Path, teacher: Path, augment: dict, **more) -> dict:
    train = write_csv(tmp_path / "train.csv", sentiment_rows(30, seed=1))
    valid = write_csv(tmp_path / "valid.csv", sentiment_rows(10, seed=2))
    return {
        "task": "sequence_classification",
        "data": {
            "files": {"train": str(train), "validation": str(valid)},
            "label_names": ["negative", "positive"],
            "augment": augment,
        },
        "teacher": {"path": str(teacher)},
        "student": {"kind": "from_teacher", "layers": [0, 3]},
        "training": {"batch_size": 8, "max_steps": 2, "log_with": [], "progress": False},
        "output_dir": str(tmp_path / "run"),
        **more,
    }


def test_a_run_trains_on_cached_augmented_rows_that_carry_no_label(tmp_path, capsys):
    teacher = save_tiny_bert(tmp_path / "teacher", num_labels=2)
    config = load_config(data=_config(tmp_path, teacher, {"copies": 2, "p_replace": 0.3}))
    parts = build_parts(config)
    printed = capsys.readouterr().out
    assert "replacements from the teacher's embedding space" in printed  # the tiny BERT has no masked-LM head
    augmented = parts.train_examples[30:]
    assert 30 < len(augmented) <= 60 and all(e["labels"] == -100 for e in augmented)
    assert all(e["labels"] != -100 for e in parts.train_examples[:30])
    cached = next(line for line in printed.splitlines() if line.startswith("augmented:"))
    directory = Path(cached.split("cached in ")[1].split(")")[0])
    rows = [json.loads(line) for line in (directory / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == len(augmented) and all(row["label"] is None for row in rows)
    stamp = (directory / "rows.jsonl").stat().st_mtime_ns
    again = build_parts(config)  # the same texts, from the cache
    assert "cached in" in capsys.readouterr().out and (directory / "rows.jsonl").stat().st_mtime_ns == stamp
    assert [e["input_ids"] for e in again.train_examples] == [e["input_ids"] for e in parts.train_examples]
    baseline = load_config(data=_config(tmp_path, teacher, {"copies": 2}, mode="baseline"))
    assert len(build_parts(baseline).train_examples) == 30
    assert "data.augment is left out" in capsys.readouterr().out


def test_paraphrases_from_a_local_causal_lm(tmp_path, capsys):
    writer = tmp_path / "writer"
    make_tiny_llama().save_pretrained(writer)
    make_tiny_chat_tokenizer().save_pretrained(writer)
    teacher = save_tiny_bert(tmp_path / "teacher", num_labels=2)
    augment = {"copies": 0, "paraphrase": {"model": str(writer), "limit": 6, "count": 2, "max_new_tokens": 8}}
    parts = build_parts(load_config(data=_config(tmp_path, teacher, augment)))
    out = capsys.readouterr().out
    assert "paraphrases 6 texts (2 each)" in out
    directory = Path(out.split("cached in ")[1].split(")")[0])
    written = [json.loads(line) for line in (directory / "paraphrases.jsonl").read_text().splitlines()]
    assert len(written) == 12 and {r["sample"] for r in written} == {0, 1}  # kdistill generate's records
    rows = [json.loads(line) for line in (directory / "rows.jsonl").read_text().splitlines()]
    augmented = parts.train_examples[30:]
    assert 0 < len(augmented) == len(rows) <= 12 and all(e["labels"] == -100 for e in augmented)


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ({"p_mask": 0.6, "p_replace": 0.5}, "p_mask + p_replace must be at most 1"),
        ({"copies": 0}, "copies is 0 and there is no paraphrase section"),
        ({"ngram_range": [3, 2]}, "ngram_range must be [low, high]"),
        ({"paraphrase": {"prompt": "say it again"}}, "must contain {text}"),
    ],
)
def test_bad_settings_are_named(tmp_path, augment, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", r"\+").replace("{", r"\{")):
        load_config(data=_config(tmp_path, tmp_path, augment))


def test_mlm_without_a_head_is_refused(tmp_path):
    teacher = save_tiny_bert(tmp_path / "teacher", num_labels=2)
    with pytest.raises(InvalidArgumentError, match="needs a teacher whose weights hold a masked-LM head"):
        build_parts(load_config(data=_config(tmp_path, teacher, {"replace_with": "mlm"})))


def test_the_replacer_sees_only_the_drafts_still_needed():
    calls: list[int] = []
    inner = neighbour_replacer({"good": ["fine"], "awful": ["bad"]}, 0)

    def counting(rows, positions):
        calls.append(len(rows))
        return inner(rows, positions)

    spec = RuleAugmentation(p_mask=0.2, p_replace=0.5, p_ngram=0.3)
    made = augment_words(ROWS, 2, spec, counting, seed=3)
    assert calls[0] == 2 * len(ROWS)  # the first round: two drafts per row
    assert all(later < calls[0] for later in calls[1:]) and len(calls) <= 3  # then only the missing copies
    kept = {i: sum(1 for j, _ in made if j == i) for i in range(len(ROWS))}
    assert kept[0] == kept[1] == 2 and sum(calls) - len(made) < len(ROWS) * 4
