"""A word-level tokenizer for recurrent students that bring their own vocabulary (BiLSTM, BiGRU).

Words are runs of letters/digits/underscore; every other non-space character is a word of its own
(``"don't!"`` → ``don ' t !``). The vocabulary holds the most frequent words of a corpus, ties broken
alphabetically, so building it twice from the same texts gives the same ids. Calling the tokenizer mirrors a
Hugging Face tokenizer closely enough for kdistill's tasks: lists of ``input_ids`` / ``attention_mask``,
optional character ``offset_mapping``, ``word_ids(i)`` on the result, and ``save_pretrained`` /
``from_pretrained``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kdistill.errors import InvalidArgumentError, KdistillError

PAD_TOKEN, UNK_TOKEN, SEP_TOKEN = "[PAD]", "[UNK]", "[SEP]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, SEP_TOKEN)  # ids 0, 1, 2
FILE_NAME = "word_tokenizer.json"

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class WordEncoding(dict):
    """What :class:`WordTokenizer` returns: a dict of lists, plus ``word_ids(i)`` like a fast HF tokenizer's."""

    def __init__(self, data: dict[str, Any], word_ids: list[list[int | None]]) -> None:
        super().__init__(data)
        self._word_ids = word_ids

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """The word each token of row ``batch_index`` comes from (None for ``[SEP]``); words map 1:1 to tokens."""
        return list(self._word_ids[batch_index])


class WordTokenizer:
    """Words → ids over a fixed vocabulary; ``[PAD]`` = 0, ``[UNK]`` = 1, ``[SEP]`` = 2 (joins text pairs).

    Args:
        vocab: the tokens in id order; must start with ``[PAD]``, ``[UNK]``, ``[SEP]``.
        lowercase: lowercase words before the look-up (offsets always index the original text).
        model_max_length: the default ``max_length`` of :meth:`__call__`.
    """

    pad_token_id: int = 0
    unk_token_id: int = 1
    sep_token_id: int = 2
    pad_token: str = PAD_TOKEN
    unk_token: str = UNK_TOKEN
    sep_token: str = SEP_TOKEN
    is_fast: bool = False

    def __init__(self, vocab: Sequence[str], *, lowercase: bool = True, model_max_length: int = 512) -> None:
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise InvalidArgumentError(f"vocab must start with {list(SPECIAL_TOKENS)}, got {list(vocab[:3])}")
        if len(set(vocab)) != len(vocab):
            duplicates = sorted(token for token, count in Counter(vocab).items() if count > 1)
            raise InvalidArgumentError(f"vocab holds duplicate tokens: {duplicates[:5]}")
        if model_max_length < 1:
            raise InvalidArgumentError(f"model_max_length must be >= 1, got {model_max_length}")
        self._tokens = list(vocab)
        self._ids = {token: index for index, token in enumerate(self._tokens)}
        self.lowercase = lowercase
        self.model_max_length = model_max_length

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        texts: Iterable[str | Sequence[str]],
        max_vocab: int = 20000,
        min_freq: int = 1,
        lowercase: bool = True,
        model_max_length: int = 512,
    ) -> WordTokenizer:
        """A vocabulary of the ``max_vocab`` most frequent words (specials included) seen at least ``min_freq`` times.

        Args:
            texts: raw strings, or already split words (lists of strings, as in NER data).
            max_vocab: the vocabulary size cap, the three special tokens included.
            min_freq: words seen fewer times become ``[UNK]``.
            lowercase: count and look words up lowercased.
            model_max_length: the default ``max_length`` when calling the tokenizer.
        """
        if max_vocab <= len(SPECIAL_TOKENS):
            raise InvalidArgumentError(
                f"max_vocab must be > {len(SPECIAL_TOKENS)} (the special tokens), got {max_vocab}"
            )
        if min_freq < 1:
            raise InvalidArgumentError(f"min_freq must be >= 1, got {min_freq}")
        counts: Counter[str] = Counter()
        for text in texts:
            words = [word for word, _ in _split(text)] if isinstance(text, str) else list(text)
            counts.update(word.lower() if lowercase else word for word in words)
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        ranked = sorted((item for item in counts.items() if item[1] >= min_freq), key=lambda item: (-item[1], item[0]))
        vocab = list(SPECIAL_TOKENS) + [word for word, _ in ranked[: max_vocab - len(SPECIAL_TOKENS)]]
        return cls(vocab, lowercase=lowercase, model_max_length=model_max_length)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, the special tokens included."""
        return len(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def get_vocab(self) -> dict[str, int]:
        """Token → id."""
        return dict(self._ids)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """The token of each id (one id gives one string)."""
        if isinstance(ids, int):
            return self._token_of(ids)
        return [self._token_of(index) for index in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """The id of each token (``[UNK]``'s id for unknown ones); no lowercasing is applied."""
        if isinstance(tokens, str):
            return self._ids.get(tokens, self.unk_token_id)
        return [self._ids.get(token, self.unk_token_id) for token in tokens]

    def tokenize(self, text: str) -> list[str]:
        """The words of ``text`` (lowercased when the tokenizer lowercases)."""
        return [self._normalize(word) for word, _ in _split(text)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Tokens joined by spaces (``[PAD]`` and, with ``skip_special_tokens``, all specials dropped)."""
        tokens = [self._token_of(int(index)) for index in ids if int(index) != self.pad_token_id]
        if skip_special_tokens:
            tokens = [token for token in tokens if token not in SPECIAL_TOKENS]
        return " ".join(tokens)

    def _token_of(self, index: int) -> str:
        if not 0 <= index < len(self._tokens):
            raise InvalidArgumentError(f"token id {index} is outside the vocabulary of {len(self._tokens)} ids")
        return self._tokens[index]

    def _normalize(self, word: str) -> str:
        return word.lower() if self.lowercase else word

    def _id(self, word: str) -> int:
        return self._ids.get(self._normalize(word), self.unk_token_id)

    # ------------------------------------------------------------------ encoding

    def __call__(
        self,
        texts: str | Sequence[str] | Sequence[Sequence[str]],
        text_pairs: str | Sequence[str] | None = None,
        *,
        truncation: bool = True,
        max_length: int | None = None,
        return_offsets_mapping: bool = False,
        is_split_into_words: bool = False,
        **unused: Any,
    ) -> WordEncoding:
        """Encode one text or a batch (with optional second texts, joined by ``[SEP]``).

        Args:
            texts: a string, a list of strings, or with ``is_split_into_words`` a list of words / list of lists.
            text_pairs: second texts (pairs like NLI premise/hypothesis), one per text.
            truncation: cut to ``max_length`` ids; pairs lose words from the longer side first.
            max_length: defaults to ``model_max_length``.
            return_offsets_mapping: add ``offset_mapping``, the ``(start, end)`` character span of each token in its
                own text (``(0, 0)`` for ``[SEP]``); pre-split words get ``(0, len(word))``.
            is_split_into_words: ``texts`` are already words; each word is one token.
            unused: other Hugging Face tokenizer arguments (``padding=False``, ...), accepted and ignored.

        Returns:
            a :class:`WordEncoding` with ``input_ids`` and ``attention_mask`` (and ``offset_mapping``): lists of ints
            for one text, lists of such lists for a batch.
        """
        if unused.get("padding") not in (None, False, "do_not_pad"):
            raise InvalidArgumentError("WordTokenizer does not pad; collate batches with PadCollator")
        limit = self.model_max_length if max_length is None else max_length
        if limit < 1:
            raise InvalidArgumentError(f"max_length must be >= 1, got {limit}")
        single = isinstance(texts, str) or (is_split_into_words and _is_word_list(texts))
        batch = [texts] if single else list(texts)
        if text_pairs is None:
            pairs: list[Any] = [None] * len(batch)
        else:
            pairs = [text_pairs] if single else list(text_pairs)
            if len(pairs) != len(batch):
                raise InvalidArgumentError(f"got {len(batch)} texts but {len(pairs)} text_pairs")
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": []}
        if return_offsets_mapping:
            out["offset_mapping"] = []
        all_word_ids: list[list[int | None]] = []
        for text, pair in zip(batch, pairs, strict=True):
            first = self._words(text, is_split_into_words)
            second = None if pair is None else self._words(pair, is_split_into_words)
            if truncation:
                first, second = _truncate(first, second, limit)
            ids = [self._id(word) for word, _ in first]
            spans = [span for _, span in first]
            word_ids: list[int | None] = list(range(len(first)))
            if second is not None:
                ids += [self.sep_token_id] + [self._id(word) for word, _ in second]
                spans += [(0, 0)] + [span for _, span in second]
                word_ids += [None, *range(len(second))]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            if return_offsets_mapping:
                out["offset_mapping"].append(spans)
            all_word_ids.append(word_ids)
        if single:
            return WordEncoding({key: value[0] for key, value in out.items()}, all_word_ids)
        return WordEncoding(out, all_word_ids)

    def _words(self, text: str | Sequence[str], is_split_into_words: bool) -> list[tuple[str, tuple[int, int]]]:
        if is_split_into_words:
            if isinstance(text, str):
                raise InvalidArgumentError("with is_split_into_words=True each text must be a list of words")
            return [(word, (0, len(word))) for word in text]
        if not isinstance(text, str):
            raise InvalidArgumentError(
                f"expected a string, got {type(text).__name__} (pre-split words need is_split_into_words=True)"
            )
        return _split(text)

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``word_tokenizer.json`` (vocabulary and settings) into ``directory``; returns the file's path."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        payload = {
            "type": "kdistill.WordTokenizer",
            "lowercase": self.lowercase,
            "model_max_length": self.model_max_length,
            "vocab": self._tokens,
        }
        file = path / FILE_NAME
        file.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
        return file

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> WordTokenizer:
        """Load a tokenizer written by :meth:`save_pretrained`."""
        file = Path(directory) / FILE_NAME
        if not file.is_file():
            raise KdistillError(f"no {FILE_NAME} in {directory}; save one with WordTokenizer.save_pretrained")
        payload = json.loads(file.read_text(encoding="utf-8"))
        return cls(payload["vocab"], lowercase=payload["lowercase"], model_max_length=payload["model_max_length"])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


def _split(text: str) -> list[tuple[str, tuple[int, int]]]:
    return [(match.group(), match.span()) for match in _WORD.finditer(text)]


def _is_word_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def _truncate(first: list[Any], second: list[Any] | None, limit: int) -> tuple[list[Any], list[Any] | None]:
    """Cut words so the ids fit ``limit`` (a pair's ``[SEP]`` included), longest side first."""
    if second is None:
        return first[:limit], None
    budget = max(limit - 1, 0)
    first, second = list(first), list(second)
    while len(first) + len(second) > budget:
        if len(first) >= len(second) and first:
            first.pop()
        else:
            second.pop()
    return first, second
