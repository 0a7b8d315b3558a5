"""Loading splits from local files through ``datasets``, seeded splits and caps, column checks; the word tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from kdistill.data.collate import PadCollator
from kdistill.data.loading import DataError, check_columns, load_splits
from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.errors import InvalidArgumentError, KdistillError

ROWS = [{"text": f"review number {i}", "label": i % 2} for i in range(20)]


def _write(path: Path, kind: str, rows: list[dict] = ROWS) -> Path:
    if kind == "csv":
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "txt":
        path.write_text("".join(r["text"] + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl", "json", "parquet"])
def test_local_files_by_extension(tmp_path: Path, kind: str) -> None:
    train = _write(tmp_path / f"train.{kind}", kind)
    validation = _write(tmp_path / f"dev.{kind}", kind, ROWS[:3])
    splits = load_splits(files={"train": str(train), "validation": validation})
    assert list(splits) == ["train", "validation"]
    assert splits["train"].column_names == ["text", "label"] and len(splits["train"]) == 20
    assert splits["validation"][2] == {"text": "review number 2", "label": 0}


def test_text_files_and_undecodable_csv_bytes(tmp_path: Path) -> None:
    splits = load_splits(files={"train": _write(tmp_path / "lines.txt", "txt")})
    assert splits["train"].column_names == ["text"] and splits["train"][1]["text"] == "review number 1"
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"text,label\ncaf\xe9 au lait,1\nfine,0\n")  # latin-1 byte in a UTF-8 file
    rows = load_splits(files={"train": broken})["train"]
    assert rows[0]["text"] == "caf\ufffd au lait" and rows[1]["text"] == "fine"


def test_file_errors_name_split_and_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"split 'validation' does not exist: .*nope\.csv"):
        load_splits(files={"validation": tmp_path / "nope.csv"})
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match=r"unsupported extension '\.xlsx'; supported: \.csv, \.json, \.jsonl"):
        load_splits(files={"train": odd})
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError, match="split 'test' is empty"):
        load_splits(files={"test": empty})
    (tmp_path / "zero.jsonl").write_text("")
    with pytest.raises(DataError, match="split 'train' is empty"):
        load_splits(files={"train": tmp_path / "zero.jsonl"})
    with pytest.raises(DataError, match="exactly one of source"):
        load_splits()
    assert issubclass(DataError, KdistillError)


def test_split_ratios_and_limits_are_seeded(tmp_path: Path) -> None:
    files = {"all": _write(tmp_path / "all.jsonl", "jsonl")}
    ratios = {"train": 0.8, "validation": 0.1, "test": 0.1}
    splits = load_splits(files=files, split_ratios=ratios, seed=3)
    assert {name: len(part) for name, part in splits.items()} == {"train": 16, "validation": 2, "test": 2}
    texts = [set(part["text"]) for part in splits.values()]
    assert set.union(*texts) == {row["text"] for row in ROWS} and sum(map(len, texts)) == 20  # a partition
    again = load_splits(files=files, split_ratios=ratios, seed=3)
    assert again["test"]["text"] == splits["test"]["text"]
    other = load_splits(files=files, split_ratios=ratios, seed=4)
    assert other["train"]["text"] != splits["train"]["text"]

    with pytest.raises(DataError, match=r"must sum to 1; train=0\.8, test=0\.1 sum to 0\.9"):
        load_splits(files=files, split_ratios={"train": 0.8, "test": 0.1})
    with pytest.raises(DataError, match=r"split 'test' is empty: ratio 0\.01"):
        load_splits(files=files, split_ratios={"train": 0.99, "test": 0.01})

    capped = load_splits(files=files, limit={"all": 5}, seed=1)
    assert (
        len(capped["all"]) == 5
        and capped["all"]["text"] == load_splits(files=files, limit={"all": 5}, seed=1)["all"]["text"]
    )
    with pytest.raises(DataError, match="limit names split 'train', but the splits are \\['all'\\]"):
        load_splits(files=files, limit={"train": 5})


def test_hub_errors_become_data_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"could not load the dataset 'kdistill-missing/none' \(subset 'sst2'\)"):
        load_splits("kdistill-missing/none", subset="sst2")


def test_check_columns_names_role_and_existing_columns() -> None:
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    check_columns(splits, {"text_column": "text", "label_column": "label", "text_pair_column": None})
    with pytest.raises(DataError, match=r"text_column 'sentence' is not a column .* split 'train'; .*: text, label"):
        check_columns(splits, {"text_column": "sentence"})
    with pytest.raises(DataError, match=r"label_column 'gold' is not a column of the dataset; its columns"):
        check_columns(splits["train"], {"label_column": "gold"})


# ---------------------------------------------------------------- word tokenizer

TEXTS = ["The cat sat.", "The dog sat!", "A cat, a dog; the end."]


def test_word_tokenizer_vocabulary_is_deterministic() -> None:
    tokenizer = WordTokenizer.build(TEXTS)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["[PAD]", "[UNK]", "[SEP]"]
    # most frequent first, ties alphabetical
    assert tokenizer.convert_ids_to_tokens(list(range(3, 9))) == ["the", ".", "a", "cat", "dog", "sat"]
    assert WordTokenizer.build(list(reversed(TEXTS))).get_vocab() == tokenizer.get_vocab()
    assert WordTokenizer.build(TEXTS, max_vocab=5).vocab_size == 5
    assert WordTokenizer.build(TEXTS, min_freq=2).vocab_size == 3 + 6
    assert WordTokenizer.build(TEXTS, lowercase=False).convert_tokens_to_ids("The") > 2
    with pytest.raises(InvalidArgumentError, match="max_vocab must be > 3"):
        WordTokenizer.build(TEXTS, max_vocab=3)


def test_word_tokenizer_encodes_like_a_hf_tokenizer(tmp_path: Path) -> None:
    tokenizer = WordTokenizer.build(TEXTS)
    text = "The bird sat, quietly."
    encoded = tokenizer(text, return_offsets_mapping=True)
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["the", "[UNK]", "sat", ",", "[UNK]", "."]
    assert [text[a:b] for a, b in encoded["offset_mapping"]] == ["The", "bird", "sat", ",", "quietly", "."]
    assert encoded["attention_mask"] == [1] * 6

    pair = tokenizer(["the cat sat on a very long mat"], ["a dog"], max_length=6)
    assert tokenizer.convert_ids_to_tokens(pair["input_ids"][0]) == ["the", "cat", "sat", "[SEP]", "a", "dog"]
    assert pair.word_ids(0) == [0, 1, 2, None, 0, 1]

    words = tokenizer([["Cat", "sat"], ["dog"]], is_split_into_words=True)
    assert words["input_ids"] == [[6, 8], [7]] and words.word_ids(1) == [0]

    tokenizer.save_pretrained(tmp_path)
    loaded = WordTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded(text)["input_ids"] == encoded["input_ids"]
    with pytest.raises(KdistillError, match=r"no word_tokenizer\.json"):
        WordTokenizer.from_pretrained(tmp_path / "elsewhere")


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_collator_pads_tensor_rows_as_it_pads_lists(side):
    rows = [[5, 6, 7], [8], [9, 10]]
    as_lists = [{"input_ids": r, "labels": [1] * len(r)} for r in rows]
    as_tensors = [{"input_ids": torch.tensor(r), "labels": torch.tensor([1] * len(r))} for r in rows]
    collate = PadCollator(pad_id=0, padding_side=side)
    want, got = collate(as_lists), collate(as_tensors)
    expected_ids = [[5, 6, 7], [8, 0, 0], [9, 10, 0]] if side == "right" else [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert want["input_ids"].tolist() == expected_ids
    assert want["labels"].tolist() == [[1 if i != 0 else -100 for i in row] for row in expected_ids]
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(got[key], want[key]), key
