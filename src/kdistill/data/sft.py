"""Supervised fine-tuning (SFT) data for causal-LM distillation: rendering, packing, corpora and collation.

An SFT example is a dict of token lists: ``input_ids``, ``attention_mask``, ``labels`` (the HF convention: the
labels *are* the input ids, ``-100`` where nothing is learned; they are not shifted here, the causal shift lives
only in :mod:`kdistill.core.shift`), ``prompt_length`` (how many leading tokens are the prompt) and ``example_id``.
Where the teacher tokenizes differently, the example carries a nested ``teacher`` dict with the same keys, and the
batch gets ``batch["teacher"]`` (the engine's convention: ``batch["teacher"]`` holds the teacher's inputs). With
``render_sft(..., offsets=True)`` both tokenizations also carry ``completion_offsets``: each token's characters within
the assistant completions, which is how cross-tokenizer alignment (:mod:`kdistill.distillers.lm_cross`) pairs the two.

* :func:`render_sft` turns instruction / chat / prompt-completion records into such examples, with the prompt masked;
* :func:`pack_texts` cuts a plain-text corpus into fixed-size blocks where every token is learned;
* :func:`chatterbot_dialogs` reads the English dialog pairs shipped in the PyPI package ``chatterbot-corpus``;
* :func:`load_sft_records` reads records from ``.jsonl`` / ``.json`` files;
* :class:`SFTCollator` pads examples into batches.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdistill.core.shift import IGNORE_INDEX
from kdistill.data.loading import DataError
from kdistill.data.packaged import MissingPackageError
from kdistill.errors import InvalidArgumentError, UnknownNameError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SFTCollator",
    "SFTExamples",
    "chatterbot_dialogs",
    "load_sft_records",
    "pack_texts",
    "render_sft",
]

CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus"

_PADDED_KEYS = ("input_ids", "attention_mask", "labels")
COMPLETION_OFFSETS = "completion_offsets"  # per token, its characters in the completion text (render_sft offsets=True)


def _as_token_list(value: Any, key: str, index: int) -> list[int]:
    """A 1-D token sequence (list, tuple or tensor) as a list of ints; a clear error for anything else."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise InvalidArgumentError(
                f"example {index}: {key!r} must be one-dimensional, got a tensor of shape {tuple(value.shape)}"
            )
        return [int(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    raise InvalidArgumentError(
        f"example {index}: {key!r} must be a list or tensor of ints, got {type(value).__name__}"
    )


@dataclass(frozen=True)
class SFTCollator:
    """Pad causal-LM examples into a batch of ``torch.long`` tensors.

    ``input_ids`` (``pad_token_id``), ``attention_mask`` (0; all ones when absent) and ``labels`` (``label_pad_id``)
    are right-padded to the longest row, rounded up to ``pad_to_multiple_of``. With ``with_prompts`` the batch also
    holds ``prompt_input_ids`` and ``prompt_attention_mask``: each example's first ``prompt_length`` tokens,
    *left*-padded so that generation (on-policy distillation, evaluation) continues every row from its last
    column. A nested ``teacher`` dict (the teacher's own tokenization) is collated the same way into
    ``batch["teacher"]``. Other keys pass through: ints become a long tensor, floats a float tensor, equal-shape
    tensors are stacked, anything else stays a list.

    Args:
        pad_token_id: the id written into padded ``input_ids`` (and ``prompt_input_ids``) positions.
        label_pad_id: the label of padded positions; ``-100`` is ignored by every loss.
        pad_to_multiple_of: round padded lengths up to a multiple of this (tensor-core friendly shapes).
        with_prompts: also return the left-padded prompts (examples must carry ``prompt_length``).
        teacher_pad_token_id: the id padding the teacher's own ``input_ids`` (None: ``pad_token_id``). A teacher with
            another tokenizer needs an id of *its* vocabulary there: the padded positions are masked, but the
            embedding lookup still runs on them, and the student's pad id may not exist in the teacher's vocabulary.
    """

    pad_token_id: int
    label_pad_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    with_prompts: bool = False
    teacher_pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise InvalidArgumentError(
                f"pad_token_id must be an int, got {self.pad_token_id!r} (does the tokenizer have a pad token?)"
            )
        if self.teacher_pad_token_id is not None and (
            isinstance(self.teacher_pad_token_id, bool) or not isinstance(self.teacher_pad_token_id, int)
        ):
            raise InvalidArgumentError(
                f"teacher_pad_token_id must be an int or None, got {self.teacher_pad_token_id!r} (does the teacher's "
                "tokenizer have a pad token?)"
            )
        if isinstance(self.label_pad_id, bool) or not isinstance(self.label_pad_id, int):
            raise InvalidArgumentError(f"label_pad_id must be an int, got {self.label_pad_id!r}")
        if self.pad_to_multiple_of is not None and (
            isinstance(self.pad_to_multiple_of, bool)
            or not isinstance(self.pad_to_multiple_of, int)
            or self.pad_to_multiple_of < 1
        ):
            raise InvalidArgumentError(
                f"pad_to_multiple_of must be a positive int or None, got {self.pad_to_multiple_of!r}"
            )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``examples`` (dicts of lists or tensors) into one batch dict."""
        if not examples:
            raise InvalidArgumentError("cannot collate an empty list of examples")
        for index, example in enumerate(examples):
            if not isinstance(example, Mapping):
                raise InvalidArgumentError(f"example {index} must be a dict, got {type(example).__name__}")
        batch = self._collate(examples, where="", pad_id=self.pad_token_id)
        has_teacher = ["teacher" in e for e in examples]
        if any(has_teacher):
            if not all(has_teacher):
                index = has_teacher.index(False)
                raise InvalidArgumentError(
                    f"example {index} has no 'teacher' tokenization while others have one; all or none must"
                )
            teachers = [e["teacher"] for e in examples]
            for index, teacher in enumerate(teachers):
                if not isinstance(teacher, Mapping):
                    raise InvalidArgumentError(
                        f"example {index}: 'teacher' must be a dict of token lists, got {type(teacher).__name__}"
                    )
            teacher_pad = self.pad_token_id if self.teacher_pad_token_id is None else self.teacher_pad_token_id
            batch["teacher"] = self._collate(teachers, where="teacher ", pad_id=teacher_pad)
        return batch

    def _round(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return length if multiple is None else -(-length // multiple) * multiple

    def _collate(self, examples: Sequence[Mapping[str, Any]], where: str, pad_id: int) -> dict[str, Any]:
        """Pad one tokenization (the student's, or the teachers' with ``where="teacher "`` in messages)."""
        ids: list[list[int]] = []
        masks: list[list[int]] = []
        labels: list[list[int]] = []
        for index, example in enumerate(examples):
            if "input_ids" not in example:
                raise InvalidArgumentError(
                    f"{where}example {index} has no 'input_ids' (its keys: {sorted(map(str, example))})"
                )
        has_labels = ["labels" in e for e in examples]
        if any(has_labels) and not all(has_labels):
            index = has_labels.index(False)
            raise InvalidArgumentError(f"{where}example {index} has no 'labels' while others have them")
        for index, example in enumerate(examples):
            row = _as_token_list(example["input_ids"], "input_ids", index)
            ids.append(row)
            for key, out in (("attention_mask", masks), ("labels", labels)):
                if key not in example:
                    if key == "attention_mask":
                        out.append([1] * len(row))
                    continue
                values = _as_token_list(example[key], key, index)
                if len(values) != len(row):
                    raise InvalidArgumentError(
                        f"{where}example {index}: {key!r} has {len(values)} entries but 'input_ids' has {len(row)}"
                    )
                out.append(values)
        length = self._round(max(len(row) for row in ids))
        batch: dict[str, Any] = {
            "input_ids": self._pad(ids, length, pad_id, left=False),
            "attention_mask": self._pad(masks, length, 0, left=False),
        }
        if labels:
            batch["labels"] = self._pad(labels, length, self.label_pad_id, left=False)
        if self.with_prompts:
            prompts, prompt_masks = [], []
            for index, (example, row, mask) in enumerate(zip(examples, ids, masks, strict=True)):
                count = example.get("prompt_length")
                if isinstance(count, torch.Tensor) and count.numel() == 1:
                    count = int(count.item())
                if isinstance(count, bool) or not isinstance(count, int):
                    raise InvalidArgumentError(
                        f"{where}example {index} needs an int 'prompt_length' for with_prompts=True, got {count!r}"
                    )
                if not 1 <= count <= len(row):
                    raise InvalidArgumentError(
                        f"{where}example {index}: prompt_length {count} must be between 1 and its length {len(row)}"
                    )
                prompts.append(row[:count])
                prompt_masks.append(mask[:count])
            prompt_length = self._round(max(len(p) for p in prompts))
            batch["prompt_input_ids"] = self._pad(prompts, prompt_length, pad_id, left=True)
            batch["prompt_attention_mask"] = self._pad(prompt_masks, prompt_length, 0, left=True)
        for key in examples[0]:
            if key in _PADDED_KEYS or key == "teacher":
                continue
            batch[key] = self._pass_through(key, examples, where)
        return batch

    @staticmethod
    def _pass_through(key: str, examples: Sequence[Mapping[str, Any]], where: str) -> Any:
        """An extra per-example value (``example_id``, ``prompt_length``, a category name) as a batch entry."""
        values = []
        for index, example in enumerate(examples):
            if key not in example:
                raise InvalidArgumentError(f"{where}example {index} has no {key!r} while example 0 has it")
            values.append(example[key])
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return torch.tensor(values, dtype=torch.long)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return torch.tensor(values, dtype=torch.float32)
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            return torch.stack(values)
        return values

    @staticmethod
    def _pad(rows: Sequence[Sequence[int]], length: int, value: int, *, left: bool) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            tensor = torch.tensor(row, dtype=torch.long)
            if left:
                out[i, length - len(row) :] = tensor
            else:
                out[i, : len(row)] = tensor
        return out


# ---------------------------------------------------------------------------------------------------------------
# Rendering records into SFT examples
# ---------------------------------------------------------------------------------------------------------------


class SFTExamples(list):
    """The examples :func:`render_sft` returns: a plain ``list`` of dicts that also says what was dropped.

    Attributes:
        dropped: how many records were dropped because no completion token fits in ``max_length``.
        dropped_ids: the indices of those records in the input.
    """

    dropped: int
    dropped_ids: list[int]

    def __init__(self, examples: Iterable[dict[str, Any]] = (), dropped_ids: Sequence[int] = ()) -> None:
        super().__init__(examples)
        self.dropped_ids = list(dropped_ids)
        self.dropped = len(self.dropped_ids)


def _require_str(value: Any, index: int, key: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"record {index}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _to_messages(record: Any, index: int, system_prompt: str | None) -> list[dict[str, str]]:
    """One record as a list of ``{role, content}`` messages (the common form of all three record kinds)."""
    if not isinstance(record, Mapping):
        raise InvalidArgumentError(f"record {index} must be a dict, got {type(record).__name__}")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, (list, tuple)) or not raw:
            raise InvalidArgumentError(f"record {index}: 'messages' must be a non-empty list of {{role, content}}")
        messages = []
        for position, message in enumerate(raw):
            if not isinstance(message, Mapping):
                raise InvalidArgumentError(
                    f"record {index}: message {position} must be a dict, got {type(message).__name__}"
                )
            for key in ("role", "content"):
                if key not in message:
                    raise InvalidArgumentError(f"record {index}: message {position} has no {key!r}")
                _require_str(message[key], index, f"messages[{position}].{key}")
            messages.append({"role": message["role"], "content": message["content"]})
        if not any(m["role"] == "assistant" for m in messages):
            raise InvalidArgumentError(f"record {index}: 'messages' has no 'assistant' message, so nothing to learn")
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise InvalidArgumentError(f"record {index} has no {key!r}")
        messages = [
            {"role": "user", "content": _require_str(record["prompt"], index, "prompt")},
            {"role": "assistant", "content": _require_str(record["completion"], index, "completion")},
        ]
    elif "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if key not in record:
                raise InvalidArgumentError(f"record {index} has no {key!r}")
        prompt = _require_str(record["instruction"], index, "instruction")
        extra = record.get("input")
        if extra is not None and _require_str(extra, index, "input"):
            prompt = f"{prompt}\n\n{extra}"
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _require_str(record["output"], index, "output")},
        ]
    else:
        raise InvalidArgumentError(
            f"record {index} has none of 'messages', 'instruction'/'output' or 'prompt'/'completion' "
            f"(its keys: {sorted(map(str, record))})"
        )
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _leading_bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos]`` when the tokenizer itself starts sequences with BOS (Llama-style), else ``[]`` (GPT-2-style)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _has_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _same_tokenization(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers render and tokenize alike: same vocabulary, chat template and special tokens."""
    if a is b:
        return True
    return (
        a.get_vocab() == b.get_vocab()
        and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
        and (a.bos_token_id, a.eos_token_id) == (b.bos_token_id, b.eos_token_id)
        and _leading_bos(a) == _leading_bos(b)
    )


def _template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], index: int, gen: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as error:  # jinja raises its own errors (e.g. "roles must alternate")
        raise InvalidArgumentError(f"record {index}: the tokenizer's chat template failed: {error}") from error
    if not isinstance(text, str):
        raise InvalidArgumentError(f"record {index}: the chat template rendered {type(text).__name__}, not a string")
    return text


def _segments(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, index: int, add_eos: bool
) -> list[tuple[str | list[int], bool]]:
    """The conversation as ``(text or token ids, learned)`` pieces in order; assistant content is learned.

    With a chat template, the conversation is rendered prefix by prefix: the text that
    ``apply_chat_template(messages[:i], add_generation_prompt=True)`` adds is masked, what rendering the assistant
    message ``i`` then adds is learned (its content and the template's end-of-turn). Without a template the plain
    format is used: BOS if the tokenizer adds one, then ``system + "\\n\\n"``, ``user + "\\n"`` masked, the
    assistant content learned and followed by EOS (``add_eos``), a ``"\\n"`` between an assistant turn and the next.
    """
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if add_eos and eos_id is None:
        raise InvalidArgumentError("the tokenizer has no EOS token; pass add_eos=False or set tokenizer.eos_token")
    pieces: list[tuple[str | list[int], bool]] = []
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if not _has_template(tokenizer):
        pieces.append((_leading_bos(tokenizer), False))
        after_assistant = False
        for message in messages:
            if message["role"] == "assistant":
                pieces.append((message["content"], True))
                if add_eos:
                    pieces.append(([eos_id], True))
                after_assistant = True
            else:
                end = "\n\n" if message["role"] == "system" else "\n"
                pieces.append((("\n" if after_assistant else "") + message["content"] + end, False))
                after_assistant = False
        return pieces

    def extend(rendered: str, text: str, learned: bool) -> str:
        if not text.startswith(rendered):
            raise InvalidArgumentError(
                f"record {index}: the chat template does not render the conversation prefix by prefix (a longer "
                "conversation does not start with the shorter one's text), so the assistant turns cannot be located"
            )
        pieces.append((text[len(rendered) :], learned))
        return text

    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            rendered = extend(rendered, _template(tokenizer, messages[:i], index, gen=True), False)
            rendered = extend(rendered, _template(tokenizer, messages[: i + 1], index, gen=False), True)
            span = pieces[-1][0]
            if i == last_assistant and add_eos and isinstance(span, str) and not span.rstrip().endswith(eos):
                pieces.append(([eos_id], True))
        else:
            rendered = extend(rendered, _template(tokenizer, messages[: i + 1], index, gen=False), False)
    return pieces


def _tokenize_conversation(
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    index: int,
    add_eos: bool,
    offsets: list[tuple[int, int]] | None = None,
) -> tuple[list[int], list[bool], int]:
    """Token ids, a per-token learned flag, and the prompt length (tokens before the first learned one).

    When ``offsets`` is a list, it is filled with each token's span in the completion text (see
    :func:`_completion_spans`).
    """
    pieces = _segments(messages, tokenizer, index, add_eos)
    texts = [piece for piece, _ in pieces if isinstance(piece, str)]
    spans: Iterable[list[tuple[int, int]]] = iter(())
    if offsets is None or not texts:
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    else:
        token_ids, piece_spans = _encode_with_spans(tokenizer, texts)
        encoded, spans = iter(token_ids), iter(piece_spans)
    contents = iter([m["content"] for m in messages if m["role"] == "assistant"])
    ids: list[int] = []
    learned: list[bool] = []
    prompt_length: int | None = None
    base = 0  # where the current assistant turn starts in the completion text
    tail = (0, 0)  # the end-of-turn span of the latest assistant turn
    for piece, is_learned in pieces:
        tokens = list(next(encoded)) if isinstance(piece, str) else piece
        if is_learned and prompt_length is None:
            prompt_length = len(ids)
        ids.extend(tokens)
        learned.extend([is_learned] * len(tokens))
        if offsets is None:
            continue
        if not is_learned:
            offsets.extend([(0, 0)] * len(tokens))
            if isinstance(piece, str):
                next(spans)
        elif isinstance(piece, str):
            piece_offsets, size = _completion_spans(piece, next(contents), next(spans), base)
            offsets.extend(piece_offsets)
            tail = (base + size, base + size + 1)
            base += size + 1
        else:  # ids added after the text (the EOS of the last turn): the end of that turn
            offsets.extend([tail] * len(tokens))
    return ids, learned, len(ids) if prompt_length is None else prompt_length


def _encode_with_spans(
    tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and each token's character span in its text.

    A fast tokenizer gives the spans itself (``return_offsets_mapping``). For a slow one they are measured by
    decoding: token ``i`` spans ``len(decode(ids[:i]))`` to ``len(decode(ids[:i + 1]))``, exact whenever decoding
    gives back the text (quadratic in a piece's length; pieces are one chat turn).
    """
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        spans = [[(int(a), int(b)) for a, b in row] for row in encoding["offset_mapping"]]
        return [list(row) for row in encoding["input_ids"]], spans
    token_ids = [list(row) for row in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    spans = []
    for row in token_ids:
        lengths = [0] + [len(tokenizer.decode(row[: i + 1])) for i in range(len(row))]
        spans.append([(lengths[i], max(lengths[i], lengths[i + 1])) for i in range(len(row))])
    return token_ids, spans


def _completion_spans(
    piece: str, content: str, spans: Sequence[tuple[int, int]], base: int
) -> tuple[list[tuple[int, int]], int]:
    """The spans of one assistant turn's tokens in the completion text, and the turn's content length.

    The completion text is the assistant contents, each followed by one pseudo-character standing for its end of
    turn. Two chat templates wrap the same content in different markup, so positions are measured from the start of
    the content within the rendered turn (``piece``): a token inside the content keeps its characters, a token of
    the markup after it (the template's end-of-turn tokens) covers the end-of-turn pseudo-character, so both
    models' end-of-turn tokens fall into one aligned group, and markup before the content gets ``(0, 0)`` (not
    aligned). A template that alters the content (the content is not found in the rendered turn) is measured over
    the whole rendered turn instead.
    """
    start = piece.find(content) if content else -1
    size = len(content)
    if start < 0:
        start, size = 0, len(piece)
    out = []
    for a, b in spans:
        left = min(max(a - start, 0), size)
        right = b - start if b - start <= size else size + 1
        out.append((base + left, base + right) if right > left else (0, 0))
    return out, size


def _example(
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    index: int,
    *,
    max_length: int,
    mask_prompt: bool,
    add_eos: bool,
    offsets: bool = False,
) -> dict[str, Any] | None:
    """One rendered, truncated example, or None when no learned (completion) token fits in ``max_length``."""
    spans: list[tuple[int, int]] | None = [] if offsets else None
    ids, learned, prompt_length = _tokenize_conversation(messages, tokenizer, index, add_eos, spans)
    ids, learned = ids[:max_length], learned[:max_length]
    if not any(learned):
        return None
    labels = [
        t if (is_learned or not mask_prompt) else IGNORE_INDEX for t, is_learned in zip(ids, learned, strict=True)
    ]
    example = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "prompt_length": prompt_length}
    if spans is not None:
        example[COMPLETION_OFFSETS] = [list(span) for span in spans[:max_length]]
    return example


def render_sft(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 512,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    system_prompt: str | None = None,
    mask_prompt: bool = True,
    add_eos: bool = True,
    offsets: bool = False,
) -> SFTExamples:
    """Tokenize SFT records into examples for :class:`SFTCollator`, learning the completions only.

    Records are any of (extra keys are ignored):

    * Alpaca style ``{"instruction", "input"?, "output"}``: the prompt is ``instruction`` + ``"\\n\\n" + input``
      when ``input`` is non-empty, the completion ``output``;
    * ``{"prompt", "completion"}``;
    * chat ``{"messages": [{"role", "content"}, ...]}``: every assistant turn is learned, everything else masked.

    With a chat template (``tokenizer.chat_template``) the prompt is rendered with ``add_generation_prompt=True``
    and each assistant turn is what the template adds after it (content plus the end-of-turn token), found by
    rendering the conversation prefix by prefix. Without one, the plain format is
    ``[BOS if the tokenizer adds it] [system "\\n\\n"] prompt "\\n" completion EOS`` (turns of a chat likewise:
    ``user "\\n"`` masked, ``assistant EOS`` learned). Each piece is tokenized on its own, so the prompt's tokens
    are exactly what a generation from ``input_ids[:prompt_length]`` sees. EOS is appended to the last assistant
    turn when its rendered text does not already end with it (``add_eos``), so the student learns to stop.

    Each example holds ``input_ids``, ``attention_mask``, ``labels`` (HF convention, unshifted: the ids, ``-100``
    on the prompt when ``mask_prompt``), ``prompt_length`` (the tokens before the first learned one) and
    ``example_id`` (the record's index). Examples longer than ``max_length`` keep their start and lose the end of
    the completion; a record whose prompt alone fills ``max_length`` has nothing to learn and is dropped, with a
    warning and the count on the result's ``dropped`` attribute. When ``teacher_tokenizer`` tokenizes differently
    (vocabulary, chat template or special tokens), every example also holds ``teacher``: the same rendering with
    the teacher's tokenizer (a record is dropped when either side has nothing to learn, so the two stay aligned).

    With ``offsets``, each example (and its ``teacher`` example) also holds ``completion_offsets``: per token, its
    ``[start, end)`` characters in the *completion text* (the assistant contents, each followed by one
    pseudo-character for its end of turn), ``[0, 0]`` for prompt tokens. Offsets are measured from the start of the
    assistant content, not of the rendered conversation, because two chat templates render different prompts around
    the same completion; the template's end-of-turn tokens (and an added EOS) cover the pseudo-character, so the two
    tokenizers' ends of turn are aligned with each other. Fast tokenizers give the spans
    (``return_offsets_mapping``); for slow ones they are measured by decoding growing prefixes of each piece.

    Raises:
        InvalidArgumentError: a bad record (naming its index and the missing or non-string key), a bad
            ``max_length``, or every record dropped (naming ``max_length``).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise InvalidArgumentError(f"max_length must be an int of at least 2, got {max_length!r}")
    if isinstance(records, (Mapping, str)):
        raise InvalidArgumentError(f"records must be a list of dicts, got a {type(records).__name__}")
    records = list(records)
    if not records:
        raise InvalidArgumentError("records is empty: there is nothing to render")
    conversations = [_to_messages(record, index, system_prompt) for index, record in enumerate(records)]
    teacher = None
    if teacher_tokenizer is not None and not _same_tokenization(tokenizer, teacher_tokenizer):
        teacher = teacher_tokenizer
    options = {"max_length": max_length, "mask_prompt": mask_prompt, "add_eos": add_eos, "offsets": bool(offsets)}
    examples: list[dict[str, Any]] = []
    dropped: list[int] = []
    for index, messages in enumerate(conversations):
        example = _example(messages, tokenizer, index, **options)
        teacher_example = _example(messages, teacher, index, **options) if teacher is not None else None
        if example is None or (teacher is not None and teacher_example is None):
            dropped.append(index)
            continue
        example["example_id"] = index
        if teacher_example is not None:
            example["teacher"] = teacher_example
        examples.append(example)
    if not examples:
        raise InvalidArgumentError(
            f"all {len(records)} records were dropped: each prompt fills max_length={max_length} tokens, leaving no "
            "completion token to learn; raise max_length"
        )
    if dropped:
        shown = ", ".join(map(str, dropped[:10])) + (", ..." if len(dropped) > 10 else "")
        warnings.warn(
            f"render_sft dropped {len(dropped)} of {len(records)} records whose prompt fills max_length={max_length} "
            f"tokens (record indices {shown}); their count is on the result's 'dropped' attribute",
            UserWarning,
            stacklevel=2,
        )
    return SFTExamples(examples, dropped)


# ---------------------------------------------------------------------------------------------------------------
# Plain-text corpora
# ---------------------------------------------------------------------------------------------------------------


def pack_texts(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, block_size: int, add_eos: bool = True
) -> list[dict[str, Any]]:
    """Pack a plain-text corpus into blocks of exactly ``block_size`` tokens where every token is learned.

    Each text is tokenized without special tokens, followed by EOS (``add_eos``) so the model sees where one
    document ends; the streams are concatenated in order and cut into consecutive blocks, the remainder dropped.
    Texts that tokenize to nothing are skipped (they would only add a stray EOS). Each block holds ``input_ids``,
    ``labels`` (= ``input_ids``: language-model distillation learns every position), an all-ones
    ``attention_mask``, ``prompt_length`` 0 and ``example_id`` (the block's index).

    Raises:
        InvalidArgumentError: a non-string text (naming its index), a ``block_size`` below 2, a tokenizer with no
            EOS when ``add_eos``, or fewer tokens than one block (naming both numbers).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise InvalidArgumentError(f"block_size must be an int of at least 2, got {block_size!r}")
    if isinstance(texts, str):
        raise InvalidArgumentError("texts must be a list of strings, got one string")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text {index} must be a string, got {type(text).__name__}")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise InvalidArgumentError("the tokenizer has no EOS token; pass add_eos=False or set tokenizer.eos_token")
    stream: list[int] = []
    chunk = 1000
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        for ids in tokenizer(part, add_special_tokens=False)["input_ids"] if part else []:
            if ids:
                stream.extend(ids)
                if add_eos:
                    stream.append(eos)
    if len(stream) < block_size:
        raise InvalidArgumentError(
            f"pack_texts needs at least block_size={block_size} tokens to fill one block, but the {len(texts)} "
            f"texts hold {len(stream)} tokens"
        )
    blocks = []
    for number, start in enumerate(range(0, len(stream) - block_size + 1, block_size)):
        ids = stream[start : start + block_size]
        blocks.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * block_size,
                "labels": list(ids),
                "prompt_length": 0,
                "example_id": number,
            }
        )
    return blocks


# ---------------------------------------------------------------------------------------------------------------
# Corpora: chatterbot-corpus, and records from files
# ---------------------------------------------------------------------------------------------------------------


def _chatterbot_english_dir() -> Path:
    """``chatterbot_corpus/data/english``, located through the import system without running the package."""
    try:
        spec = importlib.util.find_spec("chatterbot_corpus")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise MissingPackageError(
            f"the package 'chatterbot_corpus' is not installed; install it with: {CHATTERBOT_INSTALL}"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        folder = Path(location) / "data" / "english"
        if folder.is_dir():
            return folder
    raise MissingPackageError(
        f"the chatterbot_corpus package has no data/english folder (looked in {locations}); "
        f"reinstall it with: {CHATTERBOT_INSTALL}"
    )


def _utterance(value: Any) -> str | None:
    """A dialog entry as text: strings stripped, numbers as written, anything else (None, lists) skipped."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value.strip() or None


def chatterbot_dialogs(categories: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The English dialog pairs of the PyPI package ``chatterbot-corpus`` as chat records for :func:`render_sft`.

    Every consecutive ``(utterance, reply)`` pair within a conversation of ``data/english/<category>.yml``
    becomes ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "category": <file stem>}``. Files
    are read in sorted order, so the result is deterministic. The YAML is read with every scalar kept as the text
    written (``yes`` stays ``"yes"``, ``1.10`` stays ``"1.10"``); empty entries and entries that are not text
    (nested lists, malformed conversations) are skipped. chatterbot-corpus 1.3.3 gives 2,306 pairs.

    Args:
        categories: file stems to read (``"ai"``, ``"greetings"``, ...); all of them when None.

    Raises:
        MissingPackageError: the package is not installed (the message gives the pip command).
        UnknownNameError: an unknown category (the message lists the known ones).
    """
    import yaml

    folder = _chatterbot_english_dir()
    files = {path.stem: path for path in sorted(folder.glob("*.yml"))}
    if categories is None:
        wanted = sorted(files)
    else:
        wanted = [categories] if isinstance(categories, str) else list(categories)
        unknown = [name for name in wanted if name not in files]
        if unknown:
            raise UnknownNameError(f"unknown chatterbot category {unknown[0]!r}; known: {', '.join(sorted(files))}")
        wanted = sorted(set(wanted))
    records: list[dict[str, Any]] = []
    for name in wanted:
        with files[name].open(encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=yaml.BaseLoader)  # BaseLoader: every scalar stays a str
        conversations = data.get("conversations") if isinstance(data, dict) else None
        for conversation in conversations or []:
            if not isinstance(conversation, list):
                continue  # e.g. a mis-indented entry that YAML reads as one long string
            turns = [_utterance(value) for value in conversation]
            for utterance, reply in itertools.pairwise(turns):
                if utterance is not None and reply is not None:
                    records.append(
                        {
                            "messages": [
                                {"role": "user", "content": utterance},
                                {"role": "assistant", "content": reply},
                            ],
                            "category": name,
                        }
                    )
    return records


def load_sft_records(path: str | Path) -> list[dict[str, Any]]:
    """Records (see :func:`render_sft`) from a ``.jsonl`` file (one JSON object a line, blank lines skipped) or a
    ``.json`` file (one array of objects).

    Raises:
        DataError: a missing file, another extension, invalid JSON (naming the line), or an entry that is not an
            object (naming its line or index).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SFT records file not found: {path}")
    suffix = path.suffix.lower()
    records: list[dict[str, Any]] = []
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}, line {number}: invalid JSON ({error.msg})") from error
                if not isinstance(record, dict):
                    raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
                records.append(record)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from error
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records, got a {type(data).__name__}")
        for index, record in enumerate(data):
            if not isinstance(record, dict):
                raise DataError(f"{path}: entry {index} is a {type(record).__name__}, not a JSON object")
        records = data
    else:
        raise DataError(f"{path}: unsupported extension {path.suffix!r}; SFT records are read from .jsonl or .json")
    if not records:
        raise DataError(f"{path} holds no records")
    return records
