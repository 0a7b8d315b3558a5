"""Tiny real artifacts for CLI runs: a WordPiece tokenizer, tiny BERTs saved with it, and small data files."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_bert

WORDS = ["good", "great", "fine", "happy", "love", "bad", "awful", "sad", "hate", "poor", "the", "a", "movie", "day",
         "food", "is", "was", "very", "not", "so", "john", "mary", "paris", "london", "lives", "in", "works", "at",
         "acme", "corp", "who", "where", "what", "does"]  # fmt: skip
POSITIVE, NEGATIVE = WORDS[:5], WORDS[5:10]
QUIET = "  log_with: []\n  progress: false\n"  # the end of a YAML training section: no trackers, no progress bar


def write_tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = list(dict.fromkeys(vocab))  # "a" is a word and a letter: one id, so every id is below len(tokenizer)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_tiny_bert(directory: Path, *, task: str = "sequence", num_labels: int = 2, layers: int = 4, hidden: int = 32,
                   seed: int = 0) -> Path:  # fmt: skip
    tokenizer = write_tokenizer(directory)
    model = make_tiny_bert(num_layers=layers, hidden=hidden, vocab=len(tokenizer), num_labels=num_labels, seed=seed,
                           task=task)  # fmt: skip
    model.save_pretrained(directory)
    return directory


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        cue = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        words = [rng.choice(WORDS[10:20]) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), cue)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_conll(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        person, place = rng.choice(["john", "mary"]), rng.choice(["paris", "london"])
        for word, tag in ((person, "B-PER"), ("lives", "O"), ("in", "O"), (place, "B-LOC")):
            lines.append(f"{word} {tag}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_squad(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, place = rng.choice(["john", "mary"]), rng.choice(["paris", "london"])
        context = f"{person} lives in {place} and works at acme corp"
        start = context.index(place)
        rows.append({"question": f"where does {person} live", "context": context,
                     "answers": {"text": [place], "answer_start": [start]}})  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
