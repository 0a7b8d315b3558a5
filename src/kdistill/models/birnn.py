"""A recurrent student: a bidirectional LSTM/GRU classifier for sequence or token classification (Tang et al. 2019).

:class:`BiRNNClassifier` (embedding, :class:`MaskedBiRNN`, pooling, linear head) returns the Hugging Face output
classes, taps as ``"rnn"`` and saves like a Hugging Face model (``config.json`` with ``model_type``
:data:`BIRNN_MODEL_TYPE`, ``model.safetensors``). :func:`kdistill.models.students.build_student` builds one from a
teacher's vocabulary or a :class:`~kdistill.data.word_tokenizer.WordTokenizer`'s.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

from kdistill.errors import InvalidArgumentError, KdistillError

BIRNN_MODEL_TYPE = "kdistill-birnn"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass
class BiRNNConfig:
    """Sizes and choices of a :class:`BiRNNClassifier`."""

    vocab_size: int  # ids the embedding covers
    num_labels: int  # classes per example ("sequence") or per token ("token")
    embedding_dim: int = 300  # word-vector size
    hidden_size: int = 300  # per direction; the recurrent output has 2 × hidden_size features
    num_layers: int = 1  # stacked recurrent layers
    rnn: str = "lstm"  # "lstm" or "gru"
    dropout: float = 0.1  # on the embeddings, between recurrent layers, before the head
    pooling: str = "mean"  # sequence task: "mean" over real tokens or "max"
    task: str = "sequence"  # "sequence": logits (B, C); "token": logits (B, T, C)
    pad_token_id: int = 0  # the embedding row kept at zero gradient
    label_names: list[str] | None = None  # class names, index = label id

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_labels", "embedding_dim", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"BiRNNConfig.{name} must be a positive integer, got {value!r}")
        choices = {"rnn": ("lstm", "gru"), "pooling": ("mean", "max"), "task": ("sequence", "token")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InvalidArgumentError(f"BiRNNConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidArgumentError(f"BiRNNConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise InvalidArgumentError(
                f"BiRNNConfig.pad_token_id {self.pad_token_id} is outside the vocabulary of {self.vocab_size} ids"
            )
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise InvalidArgumentError(
                f"BiRNNConfig.label_names has {len(self.label_names)} names but num_labels is {self.num_labels}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values, with ``model_type`` marking it as a kdistill BiRNN."""
        return {"model_type": BIRNN_MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BiRNNConfig:
        """Inverse of :meth:`to_dict` (unknown keys such as ``model_type`` are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


class MaskedBiRNN(nn.Module):
    """A bidirectional LSTM/GRU run on packed sequences, so padding never enters either direction.

    Input ``(B, T, E)`` embeddings and an optional right-padded ``(B, T)`` mask; output ``(B, T, 2H)`` with zeros
    at padded positions. Its output is a plain tensor, so the feature path ``"rnn"`` taps it directly.
    """

    def __init__(self, config: BiRNNConfig) -> None:
        super().__init__()
        rnn_class = nn.LSTM if config.rnn == "lstm" else nn.GRU
        self.module = rnn_class(
            config.embedding_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )

    def forward(self, embedded: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq = embedded.shape[:2]
        if attention_mask is None:
            return self.module(embedded)[0]  # (B, T, 2H)
        mask = attention_mask.bool()
        lengths = mask.sum(1)  # (B,)
        prefix = torch.arange(seq, device=mask.device).expand(batch, seq) < lengths.unsqueeze(1)  # (B, T)
        if not torch.equal(prefix, mask):
            raise InvalidArgumentError(
                "BiRNNClassifier needs right-padded batches (attention_mask = 1s then 0s); "
                "pad with padding_side='right'"
            )
        packed = nn.utils.rnn.pack_padded_sequence(
            embedded, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False
        )
        output, _ = self.module(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=seq)  # (B, T, 2H)
        return states * mask.unsqueeze(-1).to(states.dtype)  # rows of length 0 stay all zero


class BiRNNClassifier(nn.Module):
    """Embedding → bidirectional LSTM/GRU (``self.rnn``) → pooling (sequence task) → linear head.

    Args:
        config: the sizes (see :class:`BiRNNConfig`).
    """

    def __init__(self, config: BiRNNConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.rnn = MaskedBiRNN(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(2 * config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> SequenceClassifierOutput | TokenClassifierOutput:
        """Classify each sequence (``task="sequence"``) or each token (``task="token"``).

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)``, 1 = real token; right padding. None = every token is real.
            labels: ``(B,)`` or ``(B, T)`` class ids, ``-100`` ignored; adds the mean cross-entropy as ``loss``.
            output_hidden_states: also return ``hidden_states = (embeddings (B, T, E), rnn states (B, T, 2H))``.

        Returns:
            ``logits`` ``(B, C)`` or ``(B, T, C)``, ``loss`` when ``labels`` are given, optional ``hidden_states``.
        """
        embedded = self.embedding(input_ids)  # (B, T, E)
        states = self.rnn(self.dropout(embedded), attention_mask)  # (B, T, 2H)
        if self.config.task == "token":
            logits = self.classifier(self.dropout(states))  # (B, T, C)
        else:
            logits = self.classifier(self.dropout(self._pool(states, attention_mask)))  # (B, C)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        hidden_states = (embedded, states) if output_hidden_states else None
        output_class = TokenClassifierOutput if self.config.task == "token" else SequenceClassifierOutput
        return output_class(loss=loss, logits=logits, hidden_states=hidden_states)

    def _pool(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return states.mean(1) if self.config.pooling == "mean" else states.amax(1)  # (B, 2H)
        mask = attention_mask.bool().unsqueeze(-1)  # (B, T, 1)
        if self.config.pooling == "mean":
            weights = mask.to(states.dtype)
            return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, 2H)
        lowest = torch.finfo(states.dtype).min
        pooled = states.masked_fill(~mask, lowest).amax(1)  # (B, 2H)
        return torch.where(mask.any(1), pooled, torch.zeros_like(pooled))  # empty rows pool to zeros

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embedding ``(vocab_size, embedding_dim)``."""
        return self.embedding

    def num_parameters(self, only_trainable: bool = False) -> int:
        """Number of parameters (all, or only those that require gradients)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def save_pretrained(self, directory: str | Path, **unused: Any) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (other HF arguments are ignored)."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=1), encoding="utf-8")
        state = {key: tensor.detach().cpu().contiguous() for key, tensor in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> BiRNNClassifier:
        """Load a model written by :meth:`save_pretrained`, in eval mode."""
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise KdistillError(f"{path} does not hold a saved BiRNNClassifier ({CONFIG_FILE} and {WEIGHTS_FILE})")
        values = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        if values.get("model_type") != BIRNN_MODEL_TYPE:
            raise KdistillError(f"{path / CONFIG_FILE} has model_type {values.get('model_type')!r}, not a BiRNN")
        model = cls(BiRNNConfig.from_dict(values))
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return model.eval()
