"""Teachers that write completions: a local Hugging Face causal LM, or any OpenAI-compatible server."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import torch

from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.generation.prompts import GenerationParams, Message, Prompt
from kdistill.models.loading import ModelLoadError, load_tokenizer, resolve_model_path


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
        from transformers import AutoModelForCausalLM

        path = resolve_model_path(self.path, "teacher")
        _check_causal_lm(path, self.path)
        extra: dict[str, Any] = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        # the model is not read by loading.load_model, which fixes one torch dtype: generation keeps the checkpoint's
        # own ("auto", bf16 on a GPU for most LLMs) and de-quantizes a GGUF file to float32
        dtype: Any = torch.float32 if self.gguf_file else "auto"
        try:
            tokenizer = load_tokenizer(path, "teacher", gguf_file=self.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
        except ModelLoadError:  # the tokenizer's, already naming the field and the path
            raise
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
        self._load()
        model, tokenizer = self._model, self._tokenizer
        texts = [self.render(prompt.messages) for prompt in prompts]
        # a chat template writes its own special tokens; raw text gets the tokenizer's (bos) as in pretraining
        encoded = tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=not getattr(tokenizer, "chat_template", None)
        )
        # the ids and their mask only: a BERT-style tokenizer's token_type_ids are no input of a causal LM's generate
        inputs = {key: encoded[key].to(model.device) for key in ("input_ids", "attention_mask")}
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


def _check_causal_lm(path: str, name: str) -> None:
    """Refuse a saved model whose architecture is no causal LM (a classifier, an encoder): transformers would put a
    fresh, untrained LM head on it and generate noise."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return  # a hub id or a GGUF directory: the loader decides
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise InvalidArgumentError(
            f"teacher {name} is a {architectures[0]}, not a causal language model; generate needs a model that "
            "writes text (a ...ForCausalLM)"
        )


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
