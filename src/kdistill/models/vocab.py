"""Students small enough to matter: vocabulary trimming and a factorized (low-rank) embedding.

A 2-layer copy of a 6-layer BERT keeps the teacher's whole word-piece embedding: 30,522 × 384 = 11.7M of its
15.2M parameters, most of them rows for word pieces the task's text never uses. :func:`used_token_ids` collects
the ids the training (and transfer) text tokenizes to (at least ``min_count`` times), plus the special tokens;
:func:`trim_tokenizer` writes a tokenizer whose kept pieces are renumbered ``0 … n-1`` in their old order and
whose every other piece is an alias of ``[UNK]``, which ``AutoTokenizer`` loads like any other; and
:func:`trim_embeddings` keeps the matching embedding rows of a Hugging Face model or a
:class:`~kdistill.models.birnn.BiRNNClassifier`. Every text splits into exactly the pieces the teacher's
tokenizer gives it (so the student's tokens line up one to one with the teacher's, for any text); a piece that
was not kept reads ``[UNK]``. The tokenizer still holds every piece's string (its ``len()`` is the teacher's),
but no id it produces reaches past the kept rows. (The tokenizers library writes a WordPiece vocabulary one piece
per id, so the trimmed tokenizer's ``save_pretrained`` writes its own ``tokenizer.json``; a copy loaded and saved
again by plain ``transformers`` loses the aliases, and words built from dropped pieces then read as one
``[UNK]``.)

:func:`factorize_embedding` gives a BiRNN the ``V × r`` rows of a truncated SVD of the teacher's embedding (ALBERT's
factorization, whose ``r × D`` map folds into the recurrent layer's input weights), so the student still starts
from the teacher's word vectors at a fraction of their size and of the recurrence's cost.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill._io import TRIMMED_VOCABULARY_FILE, write_json_atomically
from kdistill.errors import InvalidArgumentError
from kdistill.models.birnn import BiRNNClassifier

TOKENIZER_FILE = "tokenizer.json"


def used_token_ids(
    tokenizer: Any, texts: Iterable[Any], *, split_into_words: bool = False, min_count: int = 1
) -> list[int]:
    """The sorted ids that ``texts`` tokenize to at least ``min_count`` times, with every special token's id.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: strings, or (``split_into_words``) lists of words.
        min_count: pieces seen fewer times are left out (they will read ``[UNK]``).
    """
    counts: Counter[int] = Counter()
    batch: list[Any] = []

    def flush() -> None:
        if batch:
            encoded = tokenizer(batch, is_split_into_words=split_into_words, add_special_tokens=False)
            for row in encoded["input_ids"]:
                counts.update(row)
            batch.clear()

    for text in texts:
        if isinstance(text, str) or split_into_words:
            batch.append(list(text) if split_into_words else text)
        if len(batch) >= 2048:
            flush()
    flush()
    used = {index for index, count in counts.items() if count >= min_count}
    return sorted(used | set(tokenizer.all_special_ids))


def trim_tokenizer(tokenizer: Any, keep: Sequence[int]) -> Any:
    """A copy of a WordPiece ``tokenizer`` whose ids are ``keep``'s positions (old ids ``keep``; every other piece
    is an alias of the unknown token), splitting every text as ``tokenizer`` does.

    Raises:
        InvalidArgumentError: a tokenizer that is not a fast WordPiece one (BERT's family), or ``keep`` without
            the unknown token.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InvalidArgumentError(
            f"student.trim_vocab needs a fast tokenizer; {type(tokenizer).__name__} has no tokenizer.json"
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "WordPiece":
        raise InvalidArgumentError(
            f"student.trim_vocab trims WordPiece vocabularies (BERT's family); this tokenizer is {model.get('type')}, "
            "whose merges would reach pieces a trimmed vocabulary no longer has"
        )
    new_of = {old: new for new, old in enumerate(keep)}
    token_of = {index: token for token, index in model["vocab"].items()}
    missing = [old for old in keep if old not in token_of]
    if missing:
        raise InvalidArgumentError(f"ids {missing[:5]} are outside the tokenizer's vocabulary of {len(token_of)}")
    unk = model.get("unk_token")
    if unk not in model["vocab"] or model["vocab"][unk] not in new_of:
        raise InvalidArgumentError(f"the kept ids must include the unknown token {unk!r}")
    unk_id = new_of[model["vocab"][unk]]
    # every piece stays, so WordPiece splits words as before; a piece that was not kept is read as [UNK]
    model["vocab"] = {token: new_of.get(index, unk_id) for token, index in model["vocab"].items()}
    spec["added_tokens"] = [dict(t, id=new_of[t["id"]]) for t in spec.get("added_tokens", []) if t["id"] in new_of]
    _renumber_post_processor(spec.get("post_processor"), new_of)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        path = Path(directory)
        (path / TOKENIZER_FILE).write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        (path / "vocab.txt").unlink(missing_ok=True)  # one id per line cannot say that pieces share [UNK]'s
        from transformers import AutoTokenizer

        trimmed = AutoTokenizer.from_pretrained(directory)
    trimmed.name_or_path = getattr(tokenizer, "name_or_path", "")
    record = {"kept": len(keep), "of": len(token_of)}
    _keep_aliases_on_save(trimmed, json.dumps(spec, ensure_ascii=False), record)
    return trimmed


def _keep_aliases_on_save(tokenizer: Any, spec_text: str, record: dict[str, int]) -> None:
    """``save_pretrained`` that writes the aliased vocabulary: the tokenizers library serializes a WordPiece
    vocabulary from its id → piece map, one piece per id, which would drop every alias of [UNK] (and with them
    the splits of the words they build)."""
    save = tokenizer.save_pretrained

    def save_pretrained(directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        written = save(directory, *args, **kwargs)
        (Path(directory) / TOKENIZER_FILE).write_text(spec_text, encoding="utf-8")
        (Path(directory) / "vocab.txt").unlink(missing_ok=True)
        write_json_atomically(Path(directory) / TRIMMED_VOCABULARY_FILE, record)
        return written

    tokenizer.save_pretrained = save_pretrained


def _renumber_post_processor(processor: Any, new_of: dict[int, int]) -> None:
    if not isinstance(processor, dict):
        return
    for special in (processor.get("special_tokens") or {}).values():
        special["ids"] = [new_of[i] for i in special.get("ids", [])]
    for key in ("cls", "sep"):  # BertProcessing: [token, id]
        if isinstance(processor.get(key), list) and len(processor[key]) == 2:
            processor[key][1] = new_of[processor[key][1]]
    for inner in processor.get("processors") or []:
        _renumber_post_processor(inner, new_of)


def trim_embeddings(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only the input-embedding rows ``keep`` of ``model`` (in place; row ``i`` is old row ``keep[i]``).

    Works for Hugging Face models (``get_input_embeddings`` / ``set_input_embeddings``; ``config.vocab_size``
    and ``config.pad_token_id`` follow) and BiRNN students. A model whose output layer shares the embedding
    (a masked or causal LM head) is refused: its outputs would be over the trimmed vocabulary too.
    """
    old = model.get_input_embeddings()
    if not isinstance(old, nn.Embedding):
        raise InvalidArgumentError(f"student.trim_vocab needs an nn.Embedding input layer, not {type(old).__name__}")
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and get_output() is not None:
        raise InvalidArgumentError("student.trim_vocab applies to classifiers; this model predicts tokens")
    index = torch.tensor(list(keep), dtype=torch.long, device=old.weight.device)
    if int(index.max()) >= old.num_embeddings or int(index.min()) < 0:
        raise InvalidArgumentError(f"kept ids reach {int(index.max())}, outside the {old.num_embeddings} rows")
    new_of = {int(o): n for n, o in enumerate(keep)}
    pad = old.padding_idx
    new = nn.Embedding(len(keep), old.embedding_dim, padding_idx=new_of.get(pad) if pad is not None else None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight.index_select(0, index))
    config = getattr(model, "config", None)
    if hasattr(model, "set_input_embeddings") and not hasattr(model, "rnn"):
        model.set_input_embeddings(new)
    else:
        model.embedding = new
    if config is not None:
        config.vocab_size = len(keep)
        pad_id = getattr(config, "pad_token_id", None)
        if pad_id is not None:
            config.pad_token_id = new_of.get(int(pad_id), 0)
    return model


def factorize_embedding(model: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """A BiRNN like ``model`` whose embedding is ``model``'s ``V × D`` rows projected on their top ``rank``
    principal directions (truncated SVD: ``U_r S_r``, ``V × rank``), its recurrent layer reading ``rank`` features.

    ALBERT factorizes an embedding as ``V × r`` rows times an ``r × D`` map; before a recurrent layer, whose
    first operation on its input is linear, that map folds into the layer's input weights, so the student keeps
    the rows alone (the same functions, ``r × D`` fewer parameters, a cheaper recurrence). The recurrent layer and
    the head are drawn afresh from ``seed`` (they were untrained).
    """
    if not isinstance(model, BiRNNClassifier):
        raise InvalidArgumentError("student.embed_rank applies to BiRNN students (bilstm, bigru)")
    weight = model.embedding.weight.detach().float()
    dim = weight.shape[1]
    if not 0 < rank < dim:
        raise InvalidArgumentError(
            f"student.embed_rank must be between 1 and the embedding size {dim - 1}, got {rank}"
        )
    u, s, _ = torch.linalg.svd(weight, full_matrices=False)
    config = dataclasses.replace(model.config, embedding_dim=rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        smaller = BiRNNClassifier(config)
    with torch.no_grad():
        smaller.embedding.weight.copy_(u[:, :rank] * s[:rank])
    return smaller.to(weight.device)


def embedding_parameters(model: nn.Module) -> int:
    """How many parameters the input embedding holds."""
    return sum(p.numel() for p in model.get_input_embeddings().parameters())
