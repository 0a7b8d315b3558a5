"""Supervised fine-tuning (SFT) data for causal-LM distillation: records and plain text rendered into examples.

An SFT example is a dict of token lists: ``input_ids``, ``attention_mask``, ``labels`` (the HF convention: the
labels *are* the input ids, ``-100`` where nothing is learned; they are not shifted here, the causal shift lives
only in :mod:`kdistill.core.shift`), ``prompt_length`` (how many leading tokens are the prompt) and ``example_id``.
Where the teacher tokenizes differently, the example carries a nested ``teacher`` dict with the same keys, and the
batch gets ``batch["teacher"]`` (the engine's convention: ``batch["teacher"]`` holds the teacher's inputs). With
``render_sft(..., offsets=True)`` both tokenizations also carry ``completion_offsets``: each token's characters within
the assistant completions, which is how cross-tokenizer alignment (:mod:`kdistill.distillers.lm_cross`) pairs the two.

* :func:`render_sft` turns instruction / chat / prompt-completion records into such examples, with the prompt masked;
* :func:`pack_texts` cuts a plain-text corpus into fixed-size blocks where every token is learned.

Records come from :mod:`kdistill.data.sft_records` (chatterbot dialogs, ``.jsonl`` / ``.json`` files); the examples
are padded into batches by :class:`kdistill.data.sft_collate.SFTCollator`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kdistill.core.shift import IGNORE_INDEX
from kdistill.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["COMPLETION_OFFSETS", "SFTExamples", "pack_texts", "render_sft"]

COMPLETION_OFFSETS = "completion_offsets"  # per token, its characters in the completion text (render_sft offsets=True)


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
