"""A run's augmented texts (``data.augment``): copies of the training texts that the teacher labels.

The rule-based operators of :mod:`kdistill.data.augment` (mask, replace, n-gram window) make ``copies`` texts per
training text; replacements come from the teacher's masked-LM head when its weights hold one (``replace_with:
mlm``, or ``auto``), else from its nearest words in the teacher's embedding space. ``paraphrase`` adds texts a local
causal LM writes (the packaged SmolLM2 by default) through ``kdistill generate``'s resumable path, so an
interrupted run keeps what was written. Pairs are augmented one side at a time; token classification augments the
words (the teacher tags whatever comes out).

The texts are cached on disk (``$KDISTILL_CACHE/augment/<key>/``), keyed by the settings, the training texts and
the teacher, so every run of the same config reads the same texts and makes them once. Like the transfer set,
augmented rows carry no gold label: only the KD term and the matches learn from them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdistill._io import atomic_write_text, iter_jsonl
from kdistill.config import RunConfig
from kdistill.config.schema import AugmentConfig
from kdistill.data.augment import (
    Replacer,
    RuleAugmentation,
    Words,
    augment_words,
    embedding_neighbours,
    neighbour_replacer,
)
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.generation import GenerationParams, HFTeacher, generate_dataset
from kdistill.models.loading import resolve_model_path
from kdistill.runs.records import config_hash, default_cache_dir
from kdistill.runs.teacher import model_identity

if TYPE_CHECKING:
    from kdistill.models.loading import Tokenizer

Row = dict[str, Any]
ROWS_FILE = "rows.jsonl"
SAMPLES_SHOWN = 3


def augmented_rows(config: RunConfig, train: Any, teacher: nn.Module, teacher_tokenizer: Tokenizer) -> list[Row]:
    """The augmented rows in the data's own columns, labels None (from the cache when they were made before)."""
    spec = config.data.augment
    assert spec is not None and config.teacher is not None
    seed = spec.seed if spec.seed is not None else config.data.seed
    sources = _source_rows(config, train, spec.limit, seed)
    key = config_hash("augment-1", spec.model_dump(), seed, _fingerprint(sources), _teacher_identity(config))
    directory = default_cache_dir() / "augment" / key
    path = directory / ROWS_FILE
    if path.is_file():
        rows = [row for _, row in iter_jsonl(path, "the augmentation cache")]
        print(f"augmented: {len(rows):,} rows from {len(sources):,} training texts (cached in {directory})")
        return rows
    rows: list[Row] = []
    if spec.copies:
        replacer = _replacer(config, spec, teacher, teacher_tokenizer, sources, seed)
        mask_token = getattr(teacher_tokenizer, "mask_token", None) or "[MASK]"
        rows += _rule_rows(config, sources, spec, replacer, seed, mask_token)
    if spec.paraphrase is not None:
        rows += _paraphrase_rows(config, sources, spec, seed, directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"augmented: {len(rows):,} rows from {len(sources):,} training texts (cached in {directory}); for example:")
    for row in random.Random(seed).sample(rows, min(SAMPLES_SHOWN, len(rows))):
        print(f"  {_shown(config, row)}")
    return rows


def _source_rows(config: RunConfig, train: Any, limit: int | None, seed: int) -> list[Row]:
    data = config.data
    columns = [data.tokens_column] if config.task == "token_classification" else [data.text_column]
    if data.text_pair_column and config.task != "token_classification":
        columns.append(data.text_pair_column)
    rows = [{c: row[c] for c in columns} for row in train]
    if limit is not None and len(rows) > limit:
        chosen = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in chosen]
    return rows


def _fingerprint(rows: Sequence[Row]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def _teacher_identity(config: RunConfig) -> str:
    assert config.teacher is not None and config.teacher.path is not None
    return model_identity(config.teacher.path)


def _words_of(config: RunConfig, row: Row, column: str) -> Words:
    value = row[column]
    return list(value) if config.task == "token_classification" else str(value).split()


def _rule_rows(
    config: RunConfig,
    sources: list[Row],
    spec: AugmentConfig,
    replacer: Replacer | None,
    seed: int,
    mask_token: str,
) -> list[Row]:
    data = config.data
    rules = RuleAugmentation(spec.p_mask, spec.p_replace, spec.p_ngram, tuple(spec.ngram_range), mask_token)
    if config.task == "token_classification":
        words = [_words_of(config, row, data.tokens_column) for row in sources]
        made = augment_words(words, spec.copies, rules, replacer, seed)
        return [{data.tokens_column: w, data.tags_column: [None] * len(w)} for _, w in made]
    first = augment_words(
        [_words_of(config, r, data.text_column) for r in sources], spec.copies, rules, replacer, seed
    )
    if not data.text_pair_column:
        return [{data.text_column: " ".join(w), data.label_column: None} for _, w in first]
    # pairs: copy c changes the first text when c is even, the second when it is odd (the other side is kept)
    second_words = [_words_of(config, r, data.text_pair_column) for r in sources]
    second = augment_words(second_words, spec.copies, rules, replacer, seed + 1)
    made: list[dict[int, list[Words]]] = [{}, {}]
    for side, versions in ((0, first), (1, second)):
        for index, words in versions:
            made[side].setdefault(index, []).append(words)
    rows: list[Row] = []
    for index, source in enumerate(sources):
        for copy in range(spec.copies):
            side = copy % 2 if made[copy % 2].get(index) else 1 - copy % 2
            if not made[side].get(index):
                break
            words = made[side][index].pop(0)
            text, pair = source[data.text_column], source[data.text_pair_column]
            text, pair = (" ".join(words), pair) if side == 0 else (text, " ".join(words))
            rows.append({data.text_column: text, data.text_pair_column: pair, data.label_column: None})
    return rows


def _replacer(
    config: RunConfig,
    spec: AugmentConfig,
    teacher: nn.Module,
    tokenizer: Tokenizer,
    sources: list[Row],
    seed: int,
) -> Replacer | None:
    if spec.p_replace == 0:
        return None
    assert config.teacher is not None and config.teacher.path is not None
    how = spec.replace_with
    if how in ("auto", "mlm"):
        head = _masked_lm(config.teacher.path)
        if head is not None:
            print(f"augment: replacements from the masked-LM head of {config.teacher.path}")
            return mlm_replacer(head, tokenizer, seed, k=spec.neighbours)
        if how == "mlm":
            raise InvalidArgumentError(
                f"data.augment.replace_with 'mlm' needs a teacher whose weights hold a masked-LM head; "
                f"{config.teacher.path} has none (use replace_with: neighbour)"
            )
    embedding = teacher.get_input_embeddings() if hasattr(teacher, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding) or not hasattr(tokenizer, "get_vocab"):
        raise InvalidArgumentError("data.augment's replacements need a teacher with an input embedding and vocabulary")
    columns = [config.data.tokens_column] if config.task == "token_classification" else [config.data.text_column]
    columns += [config.data.text_pair_column] if config.data.text_pair_column else []
    words = {w for row in sources for c in columns if c in row for w in _words_of(config, row, c)}
    neighbours = embedding_neighbours(tokenizer.get_vocab(), embedding.weight, words, k=spec.neighbours)
    print(f"augment: replacements from the teacher's embedding space ({len(neighbours):,} words have neighbours)")
    return neighbour_replacer(neighbours, seed)


def _masked_lm(path: str) -> nn.Module | None:
    """The model at ``path`` with its masked-LM head, or None when its weights hold none."""
    from transformers import AutoModelForMaskedLM

    try:
        model, info = AutoModelForMaskedLM.from_pretrained(resolve_model_path(path), output_loading_info=True)
    except (OSError, ValueError, KeyError):
        return None
    head_missing = [k for k in info.get("missing_keys", []) if "embeddings" not in k]
    return None if head_missing else model.eval()


def mlm_replacer(model: nn.Module, tokenizer: Tokenizer, seed: int, *, k: int = 10, batch_size: int = 64) -> Replacer:
    """A :data:`Replacer` that masks the chosen words together and samples each from the head's ``k`` most likely
    whole-word pieces (not the word itself); a word the tokenizer splits into several pieces keeps one mask."""
    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()
    allowed = torch.zeros(len(vocab) if hasattr(tokenizer, "__len__") else max(vocab.values()) + 1, dtype=torch.bool)
    for token, index in vocab.items():
        if token.isalpha():
            allowed[index] = True
    inverse = {index: token for token, index in vocab.items()}
    mask = tokenizer.mask_token

    def replace(rows: Sequence[Words], positions: Sequence[Sequence[int]]) -> list[list[str | None]]:
        out: list[list[str | None]] = [[None] * len(p) for p in positions]
        work = [(n, words, list(p)) for n, (words, p) in enumerate(zip(rows, positions, strict=True)) if p]
        for start in range(0, len(work), batch_size):
            chunk = work[start : start + batch_size]
            masked = [[mask if i in set(p) else w for i, w in enumerate(words)] for _, words, p in chunk]
            encoded = tokenizer(masked, is_split_into_words=True, truncation=True, padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
            logits = logits.masked_fill(~allowed[: logits.shape[-1]], float("-inf"))
            for row, (number, words, chosen) in enumerate(chunk):
                word_ids = encoded.word_ids(row)
                first = {}
                for token_index, word in enumerate(word_ids):
                    if word is not None and word not in first:
                        first[word] = token_index
                for slot, position in enumerate(chosen):
                    if position not in first:
                        continue  # truncated away
                    top = logits[row, first[position]].topk(k + 1).indices.tolist()
                    options = [inverse[i] for i in top if inverse[i] != words[position].lower()][:k]
                    out[number][slot] = rng.choice(options) if options else None
        return out

    return replace


def _paraphrase_rows(
    config: RunConfig, sources: list[Row], spec: AugmentConfig, seed: int, directory: Path
) -> list[Row]:
    """Paraphrases of the first text of each (chosen) source row, from the local causal LM."""
    data = config.data
    paraphrase = spec.paraphrase
    assert paraphrase is not None
    chosen = list(range(len(sources)))
    if paraphrase.limit is not None and len(chosen) > paraphrase.limit:
        chosen = sorted(random.Random(seed + 2).sample(chosen, paraphrase.limit))
    column = data.tokens_column if config.task == "token_classification" else data.text_column
    prompts = directory / "paraphrase-prompts.jsonl"
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in chosen:
        text = " ".join(_words_of(config, sources[index], column))
        lines.append(json.dumps({"id": index, "prompt": paraphrase.prompt.replace("{text}", text)}) + "\n")
    atomic_write_text(prompts, "".join(lines))
    params = GenerationParams(
        max_new_tokens=paraphrase.max_new_tokens,
        temperature=paraphrase.temperature,
        top_p=paraphrase.top_p,
        do_sample=True,
        seed=seed,
        num_samples=paraphrase.count,
    )
    out = directory / "paraphrases.jsonl"
    print(f"augment: {paraphrase.model} paraphrases {len(chosen):,} texts ({paraphrase.count} each) into {out}")
    generate_dataset(
        prompts,
        out,
        HFTeacher(paraphrase.model, gguf_file=paraphrase.gguf_file),
        params,
        batch_size=paraphrase.batch_size,
        prompt_field="prompt",
    )
    rows: list[Row] = []
    for _, record in iter_jsonl(out, "the paraphrases"):
        text = _first_line(str(record.get("completion", "")))
        index = int(record["id"])
        source = " ".join(_words_of(config, sources[index], column))
        if not text or text.lower() == source.lower():
            continue
        if config.task == "token_classification":
            words = text.split()
            rows.append({data.tokens_column: words, data.tags_column: [None] * len(words)})
        elif data.text_pair_column:
            rows.append({column: text, data.text_pair_column: sources[index][data.text_pair_column],
                         data.label_column: None})  # fmt: skip
        else:
            rows.append({column: text, data.label_column: None})
    if not rows:
        raise KdistillError(f"{paraphrase.model} wrote no usable paraphrase (see {out})")
    return rows


def _first_line(text: str) -> str:
    """The paraphrase itself: its first non-empty line, without quotes around it."""
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line
    return ""


def _shown(config: RunConfig, row: Row) -> str:
    data = config.data
    if config.task == "token_classification":
        return " ".join(row[data.tokens_column])
    if data.text_pair_column:
        return f"{row[data.text_column]!r} / {row[data.text_pair_column]!r}"
    return repr(row[data.text_column])
