"""Black-box (sequence-level) distillation data: a teacher writes completions for prompts, the student learns them.

``kdistill generate --teacher T --prompts P.jsonl --out D.jsonl`` reads prompts (``prompt``, ``instruction`` +
``input``, or chat ``messages``), has the teacher complete each one — a local Hugging Face model (batched, left
padding, seeded per batch) or any OpenAI-compatible server — and appends one line per (prompt, sample)::

    {"id", "messages": [...prompt turns..., {"role": "assistant", "content": completion}], "prompt",
     "completion", "teacher", "sample"}

The ``messages`` form is what the SFT renderer consumes, so the file is the student's training data as is.

Generation is resumable and safe to kill: each batch is appended with one ``write`` of complete lines followed by
``fsync``, so a kill leaves at most a torn last line, which the next run cuts off. A rerun skips the (id, sample)
pairs already written; a batch is always formed from the same prompts and seeded with ``seed + batch_index``, so a
partly written batch is generated again in full and only its missing lines are appended: with a deterministic
teacher the resumed file equals an uninterrupted run's line for line. ``D.jsonl.meta.json`` records the teacher and
the sampling parameters; a rerun with different ones is refused (``overwrite=True`` starts the file over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from kdistill.errors import InvalidArgumentError, KdistillError

Message = dict[str, str]
ProgressFn = Callable[[int, int], None]

ROLES = ("system", "user", "assistant", "tool")
# meta fields that change what the teacher writes; a rerun must agree on all of them to append to the same file
COMPARED_META_FIELDS = (
    "teacher",
    "backend",
    "model",
    "gguf_file",
    "api_base",
    "max_new_tokens",
    "do_sample",  # before temperature and top_p, which are None when greedy: the root difference is named
    "temperature",
    "top_p",
    "seed",
    "num_samples",
    "system_prompt",
    "prompt_field",
)


# ---------------------------------------------------------------------------------------------------- parameters
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


# ---------------------------------------------------------------------------------------------------- prompts
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
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and len(prompts) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InvalidArgumentError(f"{where} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise InvalidArgumentError(f"{where} must be a JSON object, got {type(record).__name__}")
            messages = _record_messages(record, _pick_field(record, prompt_field, where), where)
            if system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system_prompt})
            record_id = record.get("id", number)
            if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
                raise InvalidArgumentError(f"{where}: 'id' must be a string or an integer, got {record_id!r}")
            key = _id_key(record_id)
            if key in seen:
                raise InvalidArgumentError(f"{where}: id {record_id!r} was already used on line {seen[key]}")
            seen[key] = number
            prompts.append(Prompt(record_id, messages, number))
    if not prompts:
        raise InvalidArgumentError(f"prompts file {path} holds no prompts")
    return prompts


def _id_key(record_id: Any) -> str:
    """A hashable key that tells the id 1 from the id "1", as they come back from JSON."""
    return json.dumps(record_id)


# ---------------------------------------------------------------------------------------------------- teachers
class Teacher(Protocol):
    """What :func:`generate_dataset` needs from a teacher."""

    name: str  # recorded in every output line as "teacher"

    def meta(self) -> dict[str, Any]:
        """``backend`` and what identifies the teacher (model, file, server); compared on resume."""

    def render(self, messages: list[Message]) -> str:
        """The prompt text recorded in the output (what the teacher saw, where that is known)."""

    def generate(self, prompts: list[Prompt], params: GenerationParams, batch_index: int) -> list[list[str]]:
        """``params.num_samples`` completions for each prompt, in order; the same batch gives the same text."""


class HFTeacher:
    """A local or hub causal LM, loaded on first use; batched generation with left padding.

    Args:
        path: a model directory, hub id or ``packaged:NAME`` holding the tokenizer too.
        gguf_file: a GGUF file inside ``path``; the weights are dequantized to float32.
        device: ``"cpu"``, ``"cuda"``, ...; default cuda when available.
    """

    def __init__(self, path: str, *, gguf_file: str | None = None, device: str | None = None) -> None:
        self.name = path
        self.path = path
        self.gguf_file = gguf_file
        self.device = device
        self._model: Any = None
        self._tokenizer: Any = None

    def meta(self) -> dict[str, Any]:
        return {"backend": "hf", "gguf_file": self.gguf_file}

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kdistill.runs.run import ModelLoadError, resolve_model_path

        path = resolve_model_path(self.path, "teacher")
        extra: dict[str, Any] = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        dtype: Any = torch.float32 if self.gguf_file else "auto"
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **extra)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
        except (OSError, ValueError, ImportError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelLoadError(f"teacher: cannot load {self.path!r} as a causal LM ({reason[:200]})") from None
        tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise InvalidArgumentError(
                    f"teacher: the tokenizer of {self.path!r} has neither a pad nor an eos token"
                )
            tokenizer.pad_token = tokenizer.eos_token
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = model.to(device).eval()
        self._tokenizer = tokenizer

    def render(self, messages: list[Message]) -> str:
        """The chat template's text with the assistant's generation prompt, or the turns' text without one."""
        self._load()
        if getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(turn["content"] for turn in messages)

    def generate(self, prompts: list[Prompt], params: GenerationParams, batch_index: int) -> list[list[str]]:
        import torch

        self._load()
        model, tokenizer = self._model, self._tokenizer
        texts = [self.render(prompt.messages) for prompt in prompts]
        # a chat template writes its own special tokens; raw text gets the tokenizer's (bos) as in pretraining
        inputs = tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=not getattr(tokenizer, "chat_template", None)
        ).to(model.device)
        sampling: dict[str, Any] = {"do_sample": params.do_sample, "num_return_sequences": params.num_samples}
        if params.do_sample:
            sampling.update(temperature=params.temperature, top_p=params.top_p)
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():  # the caller's RNG stays untouched
            torch.manual_seed(params.seed + batch_index)
            output = model.generate(
                **inputs, max_new_tokens=params.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
            )  # (B * num_samples, T_prompt + T_new), rows grouped by prompt
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # left padding: every prompt ends at the same column
        decoded = [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        n = params.num_samples
        return [decoded[row * n : (row + 1) * n] for row in range(len(prompts))]


class OpenAITeacher:
    """Any OpenAI-compatible ``/chat/completions`` server (OpenAI, vLLM, llama.cpp, TGI, ...); one request a prompt.

    Args:
        model: the server's model name.
        api_base: e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``.
        api_key: sent as ``Authorization: Bearer``; None for local servers that need none.
        max_retries: retries after a 429, a 5xx or a connection error, waiting ``backoff_s * 2**attempt`` (or the
            server's ``Retry-After``, up to 60 s) in between.
        timeout_s: per request.
    """

    def __init__(
        self,
        model: str,
        *,
        api_base: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 600.0,
        name: str | None = None,
    ) -> None:
        self.model = model
        self.name = name or model
        self.api_base = api_base.rstrip("/")
        self.url = f"{self.api_base}/chat/completions"
        self.api_key = api_key
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s

    def meta(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.model, "api_base": self.api_base}

    def render(self, messages: list[Message]) -> str:
        """The last user turn: the server applies its own template, which the client never sees."""
        return messages[-1]["content"]

    def generate(self, prompts: list[Prompt], params: GenerationParams, batch_index: int) -> list[list[str]]:
        return [self._complete(prompt.messages, params) for prompt in prompts]

    def _complete(self, messages: list[Message], params: GenerationParams) -> list[str]:
        completions: list[str] = []
        while len(completions) < params.num_samples:  # some servers ignore n > 1 and return one choice
            body = {
                "model": self.model,
                "messages": messages,
                "max_tokens": params.max_new_tokens,
                "temperature": params.temperature if params.do_sample else 0.0,
                "top_p": params.top_p if params.do_sample else 1.0,
                "n": params.num_samples - len(completions),
            }
            response = self._post(body)
            try:
                choices = sorted(response["choices"], key=lambda choice: choice.get("index", 0))
                texts = [choice["message"]["content"] for choice in choices]
            except (KeyError, TypeError, AttributeError):
                raise KdistillError(
                    f"{self.url} answered without choices[].message.content: {str(response)[:200]}"
                ) from None
            if not texts or not all(isinstance(text, str) for text in texts):
                raise KdistillError(f"{self.url} answered with no completion text: {str(response)[:200]}")
            completions += [text.strip() for text in texts]
        return completions[: params.num_samples]

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            wait = self.backoff_s * 2**attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                detail = _error_detail(error)
                if error.code != 429 and error.code < 500:
                    hint = " (check the API key, --api-key-env)" if error.code in (401, 403) else ""
                    raise KdistillError(f"{self.url} answered HTTP {error.code}{hint}: {detail}") from None
                failure = f"HTTP {error.code}: {detail}"
                retry_after = error.headers.get("Retry-After") if error.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), 60.0)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                failure = f"connection failed: {getattr(error, 'reason', error)}"
            except json.JSONDecodeError:
                raise KdistillError(f"{self.url} answered with something that is not JSON") from None
            if attempt < self.max_retries:
                print(f"generate: {self.url} {failure}; retrying in {wait:g} s", file=sys.stderr, flush=True)
                time.sleep(wait)
        raise KdistillError(f"{self.url} failed after {self.max_retries + 1} attempts, last with {failure}")


def _error_detail(error: urllib.error.HTTPError) -> str:
    """The server's error message (OpenAI's ``{"error": {"message"}}`` or the body's start)."""
    try:
        text = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason or ""
    try:
        message = json.loads(text)["error"]
        message = message.get("message", message) if isinstance(message, dict) else message
        return str(message)[:200]
    except (ValueError, KeyError, TypeError):
        return text.strip()[:200] or str(error.reason)


# ---------------------------------------------------------------------------------------------------- output file
def meta_path(out_path: str | Path) -> Path:
    """``D.jsonl`` → ``D.jsonl.meta.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".meta.json")


def _check_meta(out_path: Path, meta: dict[str, Any], overwrite: bool) -> None:
    """Refuse to append to an output written with other parameters; ``overwrite`` removes it instead."""
    meta_file = meta_path(out_path)
    if overwrite:
        out_path.unlink(missing_ok=True)
        return
    if meta_file.is_file():
        try:
            existing = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            raise InvalidArgumentError(f"{meta_file} is not valid JSON; pass --overwrite to start over") from None
        for field in COMPARED_META_FIELDS:
            if existing.get(field) != meta.get(field):
                raise InvalidArgumentError(
                    f"{out_path} was generated with {field}={existing.get(field)!r}, not {meta.get(field)!r}; "
                    "use the same parameters to resume, another --out, or --overwrite to start over"
                )
    elif out_path.is_file() and out_path.stat().st_size > 0:
        raise InvalidArgumentError(
            f"{out_path} exists without {meta_file.name}, so its parameters are unknown; --overwrite starts it over"
        )


def read_done(out_path: str | Path) -> set[tuple[str, int]]:
    """The (id key, sample) pairs already in ``out_path``, after cutting off a torn last line.

    A line without its newline is what a kill during an append leaves; it is dropped and the file truncated back to
    the last complete line. A complete line that is not a generated record means the file is something else: error.
    """
    out_path = Path(out_path)
    if not out_path.is_file():
        return set()
    with out_path.open("rb+") as file:
        content = file.read()
        complete = content.rfind(b"\n") + 1
        if complete < len(content):
            print(
                f"generate: {out_path} ends in a torn line ({len(content) - complete} bytes), cut off",
                file=sys.stderr,
                flush=True,
            )
            file.truncate(complete)
            file.flush()
            os.fsync(file.fileno())
    done: set[tuple[str, int]] = set()
    # split on "\n" only: str.splitlines() would also split inside a completion holding U+2028 or U+0085
    for number, line in enumerate(content[:complete].decode("utf-8").split("\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done.add((_id_key(record["id"]), int(record["sample"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InvalidArgumentError(
                f"{out_path} line {number} is not a generated record with 'id' and 'sample'; "
                "is --out the right file? (--overwrite starts it over)"
            ) from None
    return done


def _append_lines(out_path: Path, lines: list[str]) -> None:
    """Append complete lines with one write (looped only if the OS writes part of it) and fsync them."""
    data = "".join(f"{line}\n" for line in lines).encode("utf-8")
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _print_progress(done: int, total: int) -> None:
    print(f"generate: {done}/{total} prompts", file=sys.stderr, flush=True)


@dataclass
class GenerateResult:
    """What one call of :func:`generate_dataset` did."""

    out_path: Path
    total: int  # prompts in the file (after limit)
    skipped: int  # prompts whose samples were all in the output already
    lines_written: int  # lines appended by this call


def generate_dataset(
    prompts_path: str | Path,
    out_path: str | Path,
    teacher: Teacher,
    params: GenerationParams | None = None,
    *,
    batch_size: int = 8,
    prompt_field: str = "auto",
    system_prompt: str | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = _print_progress,
) -> GenerateResult:
    """Have ``teacher`` complete every prompt of ``prompts_path`` and append the records to ``out_path``.

    Batches are fixed slices of the prompt list (batch ``b`` = prompts ``b * batch_size`` onward), generated
    under ``seed + b``; a batch whose lines are all present is skipped, a partly present one generated again and
    only its missing lines appended. See the module docstring for the format and the resumption guarantees.

    Args:
        progress: called with (prompts done, total) after each appended batch; None for silence.

    Raises:
        InvalidArgumentError: bad prompts, a bad parameter, or an existing output made with other parameters.
    """
    params = params or GenerationParams()
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    prompts = read_prompts(prompts_path, prompt_field=prompt_field, system_prompt=system_prompt, limit=limit)
    out_path = Path(out_path)
    meta = {
        "teacher": teacher.name,
        "model": None,
        "gguf_file": None,
        "api_base": None,
        **teacher.meta(),
        **params.meta(),
        "system_prompt": system_prompt,
        "prompt_field": prompt_field,
        "batch_size": batch_size,
        "prompts": str(prompts_path),
    }
    _check_meta(out_path, meta, overwrite)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from kdistill.runs.run import write_json_atomically

    write_json_atomically(meta_path(out_path), meta)
    done = read_done(out_path)
    samples = range(params.num_samples)

    def finished(prompt: Prompt) -> bool:
        return all((_id_key(prompt.id), sample) in done for sample in samples)

    total = len(prompts)
    skipped = completed = sum(finished(prompt) for prompt in prompts)
    if skipped and progress is not None:
        print(f"generate: resuming, {skipped} of {total} prompts already in {out_path}", file=sys.stderr, flush=True)
    written = 0
    for batch_index, start in enumerate(range(0, total, batch_size)):
        batch = prompts[start : start + batch_size]
        if all(finished(prompt) for prompt in batch):
            continue
        completions = teacher.generate(batch, params, batch_index)
        lines = []
        for prompt, texts in zip(batch, completions, strict=True):
            rendered = teacher.render(prompt.messages)
            for sample, text in enumerate(texts):
                if (_id_key(prompt.id), sample) in done:
                    continue
                record = {
                    "id": prompt.id,
                    "messages": [*prompt.messages, {"role": "assistant", "content": text}],
                    "prompt": rendered,
                    "completion": text,
                    "teacher": teacher.name,
                    "sample": sample,
                }
                lines.append(json.dumps(record, ensure_ascii=False))
            completed += not finished(prompt)
        _append_lines(out_path, lines)
        written += len(lines)
        done.update((_id_key(prompt.id), sample) for prompt in batch for sample in samples)
        if progress is not None:
            progress(completed, total)
    return GenerateResult(out_path, total, skipped, written)


# ---------------------------------------------------------------------------------------------------- command line
def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``generate`` to the CLI's subcommands; its handler is :func:`cmd_generate` (set as ``func``)."""
    parser = subparsers.add_parser(
        "generate", help="black-box distillation data: the teacher completes prompts (resumable jsonl)"
    )
    parser.add_argument("--teacher", help="model directory or hub id (hf); a label for the output (openai)")
    parser.add_argument("--prompts", required=True, help="jsonl with prompt, instruction (+ input) or messages")
    parser.add_argument("--out", required=True, help="output jsonl; rerunning resumes it")
    parser.add_argument("--backend", choices=["hf", "openai"], default="hf")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (per append)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    decoding = parser.add_mutually_exclusive_group()
    decoding.add_argument("--do-sample", dest="do_sample", action="store_true", default=True, help="sample (default)")
    decoding.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="batch b is generated under seed + b")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--system-prompt", help="a system turn put before each prompt")
    parser.add_argument("--prompt-field", default="auto", help="auto, messages, instruction, or a string field")
    parser.add_argument("--gguf-file", help="a GGUF file inside --teacher (hf; loaded as float32)")
    parser.add_argument("--device", help="hf: cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--api-base", default="https://api.openai.com/v1", help="openai: the server's base URL")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: env variable holding the key")
    parser.add_argument("--model", help="openai: the server's model name (default: --teacher)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--overwrite", action="store_true", help="start --out over instead of resuming it")
    parser.set_defaults(func=cmd_generate)
    return parser


def _teacher_from_args(args: argparse.Namespace) -> Teacher:
    if args.backend == "openai":
        if args.gguf_file:
            raise InvalidArgumentError("--gguf-file applies to --backend hf only")
        model = args.model or args.teacher
        if not model:
            raise InvalidArgumentError("--backend openai needs --model (or --teacher) naming the server's model")
        return OpenAITeacher(
            model, api_base=args.api_base, api_key=os.environ.get(args.api_key_env), name=args.teacher
        )
    if not args.teacher:
        raise InvalidArgumentError("--teacher is required with --backend hf (a model directory or hub id)")
    if args.model:
        raise InvalidArgumentError("--model applies to --backend openai only; give the model with --teacher")
    return HFTeacher(args.teacher, gguf_file=args.gguf_file, device=args.device)


def cmd_generate(args: argparse.Namespace) -> int:
    """``kdistill generate``: run :func:`generate_dataset` from parsed arguments; 0 on success."""
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        do_sample=args.do_sample,
        seed=args.seed,
        num_samples=args.num_samples,
    )
    result = generate_dataset(
        args.prompts,
        args.out,
        _teacher_from_args(args),
        params,
        batch_size=args.batch_size,
        prompt_field=args.prompt_field,
        system_prompt=args.system_prompt,
        limit=args.limit,
        overwrite=args.overwrite,
    )
    print(
        f"{result.total} prompts: {result.skipped} already done, {result.lines_written} lines written to "
        f"{result.out_path}"
    )
    return 0
