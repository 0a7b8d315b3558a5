"""Benchmark: what the teacher-output cache costs on disk and what it saves per epoch.

Two measurements, written to their section of bench/RESULTS.md:

1. **Bytes per cached position.** ``kdistill cache`` over the LLM demo's data (chatterbot dialogs,
   SmolLM2-135M-Instruct teacher, V = 49,152) at k = 64 in float16 with int32 ids, and over the classification
   demo's data (k = all three labels). Bytes are the shard files' sizes on disk (manifest excluded) divided by the
   number of cached positions (rows of ``head0.ids``), so every index tensor and the safetensors headers count.
2. **A distillation epoch from the cache against the live teacher, on the demo's models**: the classification demo's
   distilled student (MiniLM-L6 teacher, 6 × 384; a 2-layer student copied from its layers 0 and 5; KD at T = 2 plus
   the hidden-state match of teacher layer 6 to student layer 2) over the demo's training split. Both runs build the
   same student from the same seed and go through the same training loop (``kdistill.training.train``, no evaluation,
   no logging); only the teacher side differs: live forward passes, or the cache (k = all, float16, with the
   match's hidden states). The teacher is the packaged MiniLM with its classification head as loaded, not fine-tuned
   first: the time of a step does not depend on the weights' values. The one-off cost of writing the cache is
   reported beside it. The two epochs alternate (live, cache, live, cache, ...) and the median of each is kept.

    cd bench && python cache.py [--train 6000] [--llm-train 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from _results import machine_line, write_section
from kdistill.cli import main as cli_main
from kdistill.config import load_config
from kdistill.distillers import Distiller
from kdistill.runs.cache_checks import cached_teacher_parts
from kdistill.runs.demo import DEMO_YAML, STUDENTS, _merge
from kdistill.runs.engine import make_training_config
from kdistill.runs.parts import build_objective, build_parts
from kdistill.training import train

LLM_YAML = """
task: causal_lm
data:
  source: chatterbot
  limit: {train: 300, validation: 8, test: 8}
  max_length: 96
  system_prompt: You are a friendly chatbot. Reply briefly.
teacher: {path: "packaged:SmolLM2-135M-Instruct"}
student: {kind: from_teacher, layers: [0, 29]}
distill: {kd_loss: reverse_kl, kd_weight: 1.0, hard_weight: 0.0, temperature: 1.0}
"""


def _shard_bytes(directory: Path) -> tuple[int, int]:
    """(bytes of all shard files, cached positions) of a cache directory."""
    from safetensors import safe_open

    total = positions = 0
    for shard in sorted(directory.glob("shard-*.safetensors")):
        total += shard.stat().st_size
        with safe_open(str(shard), framework="pt") as handle:
            positions += handle.get_slice("head0.ids").get_shape()[0]
    return total, positions


def _cache_cli(config_path: Path, out: Path, *extra: str) -> float:
    started = time.perf_counter()
    code = cli_main(["cache", str(config_path), "--out", str(out), *extra])
    if code not in (0, None):
        raise SystemExit(f"kdistill cache {config_path} failed with {code}")
    return time.perf_counter() - started


def _demo_config(train: int, teacher_cache: str | None = None) -> Any:
    data = _merge(yaml.safe_load(DEMO_YAML), STUDENTS["student-2l-distilled"])
    data["teacher"]["fine_tune"] = False  # speed does not depend on the weights' values; see the docstring
    data["data"]["limit"] = {"train": train, "validation": 8, "test": 8}  # not evaluated
    data["training"].update({"eval_every": None, "log_every": 10_000, "log_with": []})
    if teacher_cache is not None:
        data["distill"]["teacher_cache"] = teacher_cache
        data["distill"]["cache_leftover"] = "renormalize"
    return load_config(data=data)


def _epoch_seconds(config: Any) -> float:
    """Wall time of one training epoch (``train`` only: parts are built and the distiller set up before)."""
    parts = build_parts(config)
    examples, collate = parts.train_examples, parts.collate
    if config.distill.teacher_cache:
        distiller, examples, collate = cached_teacher_parts(config, parts, build_objective(config, parts))
        parts.teacher = None
    else:
        teacher = parts.task.adapt_teacher(
            parts.teacher, tokenizer=parts.student_tokenizer, teacher_tokenizer=parts.teacher_tokenizer
        )
        distiller = Distiller(parts.student, teacher, build_objective(config, parts), view=parts.task.view)
    distiller.setup(collate(examples[: config.training.batch_size]))
    training = make_training_config(config)
    with tempfile.TemporaryDirectory() as scratch:
        training = dataclasses.replace(training, output_dir=scratch, progress=False)
        started = time.perf_counter()
        train(distiller, examples, training, collate_fn=collate)
        seconds = time.perf_counter() - started
    del distiller, parts
    gc.collect()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=6000, help="training examples of the epoch (the demo: 6000)")
    parser.add_argument("--llm-train", type=int, default=300, help="dialogs cached for the bytes-per-token figure")
    parser.add_argument("--rounds", type=int, default=2, help="epochs of each kind, alternating")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines: list[str] = []

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        # 1. bytes per cached position
        llm_yaml = scratch / "llm.yaml"
        llm_data = yaml.safe_load(LLM_YAML)
        llm_data["data"]["limit"]["train"] = args.llm_train
        llm_yaml.write_text(yaml.safe_dump(llm_data))
        llm_cache = scratch / "llm-cache"
        llm_seconds = _cache_cli(llm_yaml, llm_cache, "--k", "64", "--dtype", "float16", "--batch-size", "16")
        llm_bytes, llm_positions = _shard_bytes(llm_cache)

        demo_cache = scratch / "demo-cache"
        demo_yaml = scratch / "demo.yaml"
        demo_yaml.write_text(yaml.safe_dump(_demo_config(args.train).model_dump(mode="json")))
        cache_seconds = _cache_cli(demo_yaml, demo_cache, "--k", "all", "--dtype", "float16", "--batch-size", "64")
        demo_bytes, demo_positions = _shard_bytes(demo_cache)

        # 2. epochs, alternating
        live, cached = [], []
        for _ in range(args.rounds):
            live.append(_epoch_seconds(_demo_config(args.train)))
            cached.append(_epoch_seconds(_demo_config(args.train, teacher_cache=str(demo_cache))))
            print(f"epoch: live {live[-1]:.1f} s, from the cache {cached[-1]:.1f} s", flush=True)

    live_s, cached_s = statistics.median(live), statistics.median(cached)
    llm_per = llm_bytes / max(llm_positions, 1)
    demo_per = demo_bytes / max(demo_positions, 1)
    lines += [
        "## Teacher-output cache (`bench/cache.py`)",
        "",
        f"{machine_line()}.",
        "",
        "| cache | positions | bytes on disk | bytes / position | written in |",
        "|---|---|---|---|---|",
        f"| SmolLM2-135M-Instruct on {args.llm_train} chatterbot dialogs, k = 64 of 49,152, float16 + int32 ids "
        f"| {llm_positions:,} | {llm_bytes:,} | **{llm_per:.1f}** | {llm_seconds:.0f} s |",
        f"| classification demo: MiniLM-L6, {args.train} tweets (one position each), k = all 3 labels, float16, "
        f"+ the layer-6 hidden states the match needs (384 per token) | {demo_positions:,} | {demo_bytes:,} "
        f"| {demo_per:,.0f} | {cache_seconds:.0f} s |",
        "",
        "Target at k = 64: ≤ 400 bytes per position. "
        + ("Met." if llm_per <= 400 else f"**Not met** ({llm_per:.1f} B)."),
        "",
        f"A distillation epoch on the classification demo's models ({args.train} tweets, batch 32, KD + the "
        "layer-6→2 hidden-state match), median of "
        f"{args.rounds} alternating epochs each: live teacher {live_s:.1f} s "
        f"({', '.join(f'{s:.1f}' for s in live)}), from the cache {cached_s:.1f} s "
        f"({', '.join(f'{s:.1f}' for s in cached)}): **{live_s / cached_s:.2f}× faster** from the cache. "
        f"Writing the cache once took {cache_seconds:.0f} s (about "
        f"{cache_seconds / max(live_s - cached_s, 1e-9):.1f} epochs' saving).",
        "",
        "Target: ≥ 1.5× faster. " + ("Met." if live_s / cached_s >= 1.5 else "**Not met.**"),
    ]
    body = "\n".join(lines)
    print(body)
    write_section("cache", body)


if __name__ == "__main__":
    main()
