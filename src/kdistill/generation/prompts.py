"""Prompts for the teacher: the sampling parameters and the records of a prompts jsonl file.

A record gives its prompt as chat ``messages``, a ``prompt`` string, or an ``instruction`` (+ ``input``); see
:func:`read_prompts`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdistill._io import iter_jsonl
from kdistill.errors import InvalidArgumentError

Message = dict[str, str]

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class GenerationParams:
    """How the teacher samples; all of it is recorded in the meta file and must match on resume."""

    max_new_tokens: int = 256  # tokens generated at most per completion
    temperature: float = 0.7  # softmax temperature when sampling (ignored when greedy)
    top_p: float = 0.95  # nucleus sampling mass (ignored when greedy)
    do_sample: bool = True  # False: greedy decoding
    seed: int = 0  # batch b is generated under seed + b
    num_samples: int = 1  # completions per prompt (sampling only)

    def __post_init__(self) -> None:
        for field, least in (("max_new_tokens", 1), ("num_samples", 1), ("seed", None)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
                raise InvalidArgumentError(
                    f"{field} must be an integer{f' >= {least}' if least else ''}, got {value!r}"
                )
        if self.do_sample:
            if not self.temperature > 0:
                raise InvalidArgumentError(
                    f"temperature must be > 0 when sampling (use --greedy), got {self.temperature}"
                )
            if not 0 < self.top_p <= 1:
                raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        elif self.num_samples > 1:
            raise InvalidArgumentError(
                f"num_samples={self.num_samples} needs sampling: greedy decoding gives the same completion every time"
            )

    def meta(self) -> dict[str, Any]:
        """The parameters as recorded; temperature and top_p are None when greedy, where they change nothing."""
        fields = asdict(self)
        if not self.do_sample:
            fields.update(temperature=None, top_p=None)
        return fields


@dataclass
class Prompt:
    """One prompt record: its id, the chat turns the teacher completes, and the line it came from."""

    id: str | int
    messages: list[Message]  # system prompt (if any) first, last turn the user's
    line: int  # 1-based line number in the prompts file


def _user_text(record: dict[str, Any], field: str, where: str) -> str:
    if field == "instruction":
        instruction, extra = record.get("instruction"), record.get("input")
        if not isinstance(instruction, str) or not instruction.strip():
            raise InvalidArgumentError(f"{where}: 'instruction' must be a non-empty string")
        if extra is not None and not isinstance(extra, str):
            raise InvalidArgumentError(f"{where}: 'input' must be a string, got {type(extra).__name__}")
        return f"{instruction}\n\n{extra}" if extra else instruction
    text = record.get(field)
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(f"{where}: {field!r} must be a non-empty string")
    return text


def _record_messages(record: dict[str, Any], field: str, where: str) -> list[Message]:
    if field != "messages":
        return [{"role": "user", "content": _user_text(record, field, where)}]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    for number, turn in enumerate(messages, 1):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise InvalidArgumentError(
                f"{where}: messages turn {number} must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}"
            )
    if messages[-1]["role"] != "user":
        raise InvalidArgumentError(
            f"{where}: 'messages' must end with a user turn for the teacher to answer, "
            f"it ends with {messages[-1]['role']!r}"
        )
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def _pick_field(record: dict[str, Any], prompt_field: str, where: str) -> str:
    if prompt_field == "auto":
        for field in ("messages", "prompt", "instruction"):
            if field in record:
                return field
        raise InvalidArgumentError(
            f"{where}: the record has none of 'messages', 'prompt', 'instruction' (has: {', '.join(record) or 'none'})"
        )
    if prompt_field not in record:
        raise InvalidArgumentError(f"{where}: the record has no {prompt_field!r} field (--prompt-field)")
    return prompt_field


def read_prompts(
    path: str | Path, *, prompt_field: str = "auto", system_prompt: str | None = None, limit: int | None = None
) -> list[Prompt]:
    """The prompts of a jsonl file, in file order.

    Args:
        path: one JSON object a line; blank lines are skipped.
        prompt_field: ``"auto"`` takes ``messages``, else ``prompt``, else ``instruction`` (+ ``input``); a name
            takes that field (``messages``, ``instruction``, or any string field such as ``question``).
        system_prompt: prepended as a system turn unless the record's messages already start with one.
        limit: only the first ``limit`` prompts.

    Returns:
        Prompts whose id is the record's ``id`` (a string or an integer) or else its 1-based line number.

    Raises:
        InvalidArgumentError: naming the line of bad JSON, a record without a prompt, a bad id or a duplicate id.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"prompts file {path} does not exist")
    if limit is not None and limit < 1:
        raise InvalidArgumentError(f"limit must be >= 1, got {limit}")
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, record in iter_jsonl(path, "prompts file", InvalidArgumentError):
        if limit is not None and len(prompts) >= limit:
            break
        where = f"{path} line {number}"
        messages = _record_messages(record, _pick_field(record, prompt_field, where), where)
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        record_id = record.get("id", number)
        if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
            raise InvalidArgumentError(f"{where}: 'id' must be a string or an integer, got {record_id!r}")
        key = id_key(record_id)
        if key in seen:
            raise InvalidArgumentError(f"{where}: id {record_id!r} was already used on line {seen[key]}")
        seen[key] = number
        prompts.append(Prompt(record_id, messages, number))
    if not prompts:
        raise InvalidArgumentError(f"prompts file {path} holds no prompts")
    return prompts


def id_key(record_id: str | int) -> str:
    """A hashable key that tells the id 1 from the id "1", as they come back from JSON."""
    return json.dumps(record_id)
