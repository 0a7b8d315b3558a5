"""Benchmark: one causal-LM distillation step, plain logits against the chunked loss, at SmolLM2's vocabulary.

Run ``cd bench && python llm_memory.py``. The step is what ``DistillationTrainer`` does per micro-batch: the student's
forward with grad, the teacher's under ``no_grad``, :func:`kdistill.distillers.lm_loss.causal_lm_loss_sums` and
``backward()``. Models are tiny-depth Llamas built from configs (hidden 256, V = 49152), so the LM head and the loss
dominate as they do in LLM distillation, and the step fits a laptop.

Method (as ``bench/losses.py``): each case runs in a fresh process; peak memory is the peak RSS (``ru_maxrss``) minus
the RSS once the models and the batch exist; time is the median wall time of a few steps after one warm-up; a case
during which other processes used more than 15% of the cores is run again (3 times at most, the quietest kept).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from _measure import (
    ATTEMPTS,
    NOISY_SHARE,
    _children_cpu_seconds,
    _cpu_ticks,
    _others_share,
    _peak_rss_bytes,
    _rss_bytes,
    _wait_for_quiet,
)
from _results import machine_line, write_section
from kdistill.distillers.lm_loss import causal_lm_loss_sums

VOCAB = 49_152  # SmolLM2
HIDDEN = 256
BATCH, SEQ = 4, 512
PROMPT = 32  # the first tokens of every row are a prompt (labels -100)
THREADS = 2
REPS = 3
CHUNK_SIZES = (512, 1024)
MIB = 2**20


def _model(layers: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def run_case(chunk_size: int, hard_weight: float, reps: int) -> dict[str, Any]:
    """One case in this process: ``chunk_size`` 0 is the plain path. Returns peak RSS growth and median times."""
    torch.set_num_threads(THREADS)
    student, teacher = _model(1, seed=1).train(), _model(2, seed=0).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    labels = input_ids.clone()
    labels[:, :PROMPT] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    def step() -> float:
        student.zero_grad(set_to_none=True)
        start = time.perf_counter()
        sums = causal_lm_loss_sums(
            student,
            teacher,
            batch,
            hard_weight=hard_weight,
            chunked=chunk_size > 0,
            chunk_size=max(chunk_size, 1),
        )
        loss = sums.kd_sum if sums.hard_sum is None else sums.kd_sum + hard_weight * sums.hard_sum
        (loss / sums.count).backward()
        del sums, loss
        return time.perf_counter() - start

    baseline = _rss_bytes()
    step()  # warm-up
    times = [step() for _ in range(reps)]
    return {"peak_bytes": _peak_rss_bytes() - baseline, "seconds": statistics.median(times), "times": times}


def _spawn(chunk_size: int, hard_weight: float) -> dict[str, Any]:
    quietest: dict[str, Any] | None = None
    for _ in range(ATTEMPTS):
        _wait_for_quiet(60.0)  # this machine is shared: wait a minute at most, then measure and report the load
        command = [sys.executable, __file__, "--case", str(chunk_size), "--hard-weight", str(hard_weight)]
        print("  running", " ".join(command[2:]), flush=True)
        busy_before, total_before = _cpu_ticks()
        own_before = _children_cpu_seconds()
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        busy_after, total_after = _cpu_ticks()
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["others"] = _others_share(
            busy_after - busy_before, total_after - total_before, _children_cpu_seconds() - own_before
        )
        print(
            f"    peak +{result['peak_bytes'] / MIB:.0f} MiB, {result['seconds']:.2f} s, "
            f"others used {result['others']:.0%} of the cores",
            flush=True,
        )
        if quietest is None or result["others"] < quietest["others"]:
            quietest = result
        if result["others"] < NOISY_SHARE:
            break
    assert quietest is not None
    return quietest


def main() -> None:
    lines = [
        "| loss terms | path | chunk | peak RSS growth | step time | used by others | memory / plain | time / plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for hard_weight, terms in ((0.0, "KD"), (0.5, "KD + 0.5·CE")):
        print(f"{terms}: V = {VOCAB}, B × T = {BATCH} × {SEQ}, hidden {HIDDEN}")
        plain = _spawn(0, hard_weight)
        lines.append(
            f"| {terms} | plain | – | {plain['peak_bytes'] / MIB:.0f} MiB | {plain['seconds']:.2f} s | "
            f"{plain['others']:.0%} | 1 | 1 |"
        )
        chunked = {chunk: _spawn(chunk, hard_weight) for chunk in CHUNK_SIZES}
        for chunk, result in chunked.items():
            memory, speed = result["peak_bytes"] / plain["peak_bytes"], result["seconds"] / plain["seconds"]
            lines.append(
                f"| {terms} | chunked | {chunk} | {result['peak_bytes'] / MIB:.0f} MiB | {result['seconds']:.2f} s | "
                f"{result['others']:.0%} | {memory:.3f} | {speed:.2f} |"
            )
        best = min(chunked, key=lambda chunk: chunked[chunk]["seconds"])
        memory_ratio = chunked[best]["peak_bytes"] / plain["peak_bytes"]
        time_ratio = chunked[best]["seconds"] / plain["seconds"]
        memory_ok, time_ok = memory_ratio <= 0.5, 0.8 <= time_ratio <= 1.2 or time_ratio < 0.8
        verdicts.append(
            f"{terms}: fastest chunk {best}: memory {memory_ratio:.1%} of plain ({'met' if memory_ok else 'MISSED'}), "
            f"time {time_ratio:.2f}× plain ({'met' if time_ok else 'MISSED'})."
        )
    section = "\n".join(
        [
            "## LLM distillation step: plain vs chunked loss (`bench/llm_memory.py`)",
            "",
            f"{machine_line()}. One DistillationTrainer micro-batch: student (Llama 1 layer) forward with grad, "
            f"teacher (Llama 2 layers) forward under no_grad, `causal_lm_loss_sums` (forward_kl, T = 1), backward; "
            f"hidden {HIDDEN}, V = {VOCAB} (SmolLM2), B × T = {BATCH} × {SEQ}, {PROMPT} prompt tokens per row, "
            f"float32. Peak = peak RSS minus RSS once models and batch exist, each case in a fresh process; time = "
            f"median of {REPS} steps after a warm-up.",
            "",
            *lines,
            "",
            "Target: ≥ 50% less peak memory than plain at equal speed ± 20% (faster counts as met).",
            "",
            *verdicts,
        ]
    )
    print()
    print(section)
    write_section("llm_memory", section)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=int, help="run one case in this process: chunk size, 0 = plain (internal)")
    parser.add_argument("--hard-weight", type=float, default=0.0)
    parser.add_argument("--reps", type=int, default=REPS)
    args = parser.parse_args()
    if args.case is None:
        main()
    else:
        print(json.dumps(run_case(args.case, args.hard_weight, args.reps)))
