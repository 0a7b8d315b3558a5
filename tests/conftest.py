"""Tiny models built from configs (seeded, offline, milliseconds) and the fixtures built on them.

The factories are plain functions, importable from any test (``from conftest import make_tiny_bert``), and the
fixtures below wrap them. Every model has dropout 0 (so train and eval modes compute the same thing), eager
attention (so attention maps can be returned) unless asked otherwise, and is returned in eval mode, as
``from_pretrained`` returns it. Building a model does not touch the global random state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import SequenceClassifierOutput

try:
    from transformers import Qwen2Config, Qwen2ForCausalLM
except ImportError:  # pragma: no cover - present in transformers 5.x
    Qwen2Config = Qwen2ForCausalLM = None

ModelT = TypeVar("ModelT", bound=nn.Module)

BERT_TASKS = {
    "sequence": BertForSequenceClassification,
    "token": BertForTokenClassification,
    "qa": BertForQuestionAnswering,
}
BERT_VOCAB = 100
LLAMA_VOCAB = 128


def _seeded_build(seed: int, build: Callable[[], ModelT]) -> ModelT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def make_tiny_bert(
    num_layers: int = 4,
    hidden: int = 32,
    heads: int = 4,
    vocab: int = BERT_VOCAB,
    num_labels: int = 3,
    seed: int = 0,
    task: str = "sequence",
    attn_implementation: str = "eager",
) -> PreTrainedModel:
    """A BERT with a ``task`` head: ``"sequence"``, ``"token"`` (classification) or ``"qa"``; pad token id 0."""
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2 if task == "qa" else num_labels,  # a QA head predicts start and end
        pad_token_id=0,
        attn_implementation=attn_implementation,
    )
    return _seeded_build(seed, lambda: BERT_TASKS[task](config))


def _causal_config_kwargs(num_layers: int, hidden: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 64,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attn_implementation": "eager",
    }


def make_tiny_llama(
    num_layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2, vocab: int = LLAMA_VOCAB, seed: int = 0
) -> PreTrainedModel:
    """A ``LlamaForCausalLM`` with untied embeddings, grouped-query attention and eager attention."""
    config = LlamaConfig(**_causal_config_kwargs(num_layers, hidden, heads, kv_heads, vocab))
    return _seeded_build(seed, lambda: LlamaForCausalLM(config))


CHAT_SPECIALS = ("<pad>", "<s>", "<|im_end|>", "<unk>", "<|im_start|>")  # ids 0..4: pad, bos, eos as the tiny LMs
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def make_tiny_chat_tokenizer(vocab: int = LLAMA_VOCAB) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer for the tiny causal LMs, with a ChatML-like chat template.

    Ids 0..4 are ``<pad> <s> <|im_end|> <unk> <|im_start|>`` (pad 0, bos 1, eos 2, as in the tiny LMs' configs),
    then the roles ``system user assistant`` and lowercase words and digits up to ``vocab`` entries; unknown words
    become ``<unk>``. Text is lowercased; whitespace and punctuation split words, so offsets map tokens back to
    characters.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = ["system", "user", "assistant"]
    words += [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    words += [".", ",", "?", "!", "'"]
    common = " ".join(  # a word list reads best as text
        [
            "the a an and or to of in is are was you i me my we it what how why who hello hi good bad fine thanks",
            "yes no not do does did can will would like love know think say tell about this that there here time",
            "day name your are am be have has had go went come see look want need help make",
        ]
    ).split(" ")
    words += [w for w in common if w not in words]
    vocabulary = {token: i for i, token in enumerate(CHAT_SPECIALS)}
    for word in words:
        if len(vocabulary) >= vocab:
            break
        vocabulary.setdefault(word, len(vocabulary))
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_qwen(
    num_layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2, vocab: int = LLAMA_VOCAB, seed: int = 0
) -> PreTrainedModel:
    """A ``Qwen2ForCausalLM`` like :func:`make_tiny_llama`; skips the calling test where transformers lacks Qwen2."""
    if Qwen2ForCausalLM is None:
        pytest.skip("this transformers has no Qwen2ForCausalLM")
    config = Qwen2Config(**_causal_config_kwargs(num_layers, hidden, heads, kv_heads, vocab))
    return _seeded_build(seed, lambda: Qwen2ForCausalLM(config))


class TinyLSTMClassifier(nn.Module):
    """A BiLSTM sequence classifier (no transformer blocks): embedding → ``lstm`` → mean over real tokens → linear."""

    def __init__(self, vocab: int, embed: int, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(2 * hidden, num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        states, _ = self.lstm(self.embedding(input_ids))  # (B, T, 2H)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        weights = mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, 2H)
        logits = self.classifier(pooled)  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def make_tiny_lstm(
    vocab: int = BERT_VOCAB, embed: int = 16, hidden: int = 16, num_labels: int = 3, seed: int = 0
) -> TinyLSTMClassifier:
    """A :class:`TinyLSTMClassifier` sharing the tiny BERT's vocabulary and labels (a classic BiLSTM student)."""
    return _seeded_build(seed, lambda: TinyLSTMClassifier(vocab, embed, hidden, num_labels))


def make_batch(
    batch: int = 4,
    seq: int = 12,
    vocab: int = BERT_VOCAB,
    num_labels: int = 3,
    lengths: tuple[int, ...] = (),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` ``(batch, seq)`` right-padded with id 0, and sequence ``labels`` ``(batch,)``.

    ``lengths`` defaults to full rows alternating with padded ones (rows 1 and 3 of 4 are padded).
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = lengths or tuple(seq if row % 2 == 0 else max(1, seq - 3 * row) for row in range(batch))
    positions = torch.arange(seq).expand(batch, seq)  # (B, T)
    attention_mask = (positions < torch.tensor(lengths).unsqueeze(1)).long()  # (B, T)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=generator) * attention_mask
    labels = torch.randint(0, num_labels, (batch,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_causal_batch(
    batch: int = 4, seq: int = 12, vocab: int = LLAMA_VOCAB, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Like :func:`make_batch` for a causal LM: ``labels`` are the ``input_ids`` with -100 on padding."""
    inputs = make_batch(batch, seq, vocab, seed=seed)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


@pytest.fixture(scope="session", autouse=True)
def _session_kdistill_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every cache a test run fills (de-quantized GGUF teachers, fine-tuned teachers) lives in one temporary
    directory for the session: tests never read or write the user's ~/.cache/kdistill."""
    import os

    previous = os.environ.get("KDISTILL_CACHE")
    os.environ["KDISTILL_CACHE"] = str(tmp_path_factory.mktemp("kdistill-cache"))
    yield
    if previous is None:
        os.environ.pop("KDISTILL_CACHE", None)
    else:
        os.environ["KDISTILL_CACHE"] = previous


@pytest.fixture
def tiny_bert_teacher() -> PreTrainedModel:
    return make_tiny_bert()


@pytest.fixture
def tiny_bert_student() -> PreTrainedModel:
    return make_tiny_bert(num_layers=2, hidden=16, heads=4, seed=1)


@pytest.fixture
def tiny_llama_teacher() -> PreTrainedModel:
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_student() -> PreTrainedModel:
    return make_tiny_llama(num_layers=2, hidden=16, heads=4, kv_heads=2, seed=1)


@pytest.fixture
def tiny_qwen_teacher() -> PreTrainedModel:
    return make_tiny_qwen()


@pytest.fixture
def tiny_lstm_student() -> TinyLSTMClassifier:
    return make_tiny_lstm(seed=1)


@pytest.fixture
def tiny_chat_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_chat_tokenizer()


@pytest.fixture
def saved_tiny_bert_teacher(tmp_path: Path) -> Path:
    """The :func:`make_tiny_bert` teacher saved with ``save_pretrained``; returns its folder."""
    path = tmp_path / "tiny-bert-teacher"
    make_tiny_bert().save_pretrained(path)
    return path


@pytest.fixture
def bert_batch() -> dict[str, torch.Tensor]:
    """Batch 4, sequence 12, rows 1 and 3 padded; ``labels`` ``(4,)`` for the sequence classifier."""
    return make_batch()


@pytest.fixture
def llama_batch() -> dict[str, torch.Tensor]:
    """Batch 4, sequence 12, rows 1 and 3 padded; ``labels`` are the ids with -100 on padding."""
    return make_causal_batch()
