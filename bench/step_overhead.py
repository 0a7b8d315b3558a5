"""How much a distillation step costs over its floor (student forward+backward plus teacher forward).

Measured in one process on identical batches, round-robin so that drift hits all three alike:
(a) student forward + backward with hard-label cross-entropy, (b) teacher forward under no_grad, (c) one full
distillation micro-step as the training loop runs it: student and teacher forwards with feature taps, the KD term on
logits, two hidden-state matches through linear projections, the hard-label term, backward.
``overhead = c / (a + b)``; the target is ≤ 1.10. Writes its section of bench/RESULTS.md.

    python bench/step_overhead.py [--rounds 15] [--batch 16] [--seq 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from _results import machine_line, write_section
from kdistill.distillers import Distiller, Match, Objective, normalized_loss
from kdistill.losses import token_cross_entropy


def bert(layers: int, hidden: int, heads: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, num_labels=3, attn_implementation="sdpa")  # fmt: skip
    return BertForSequenceClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)

    teacher = bert(6, 384, 12, seed=0).eval().requires_grad_(False)  # MiniLM-L6 shape
    student = bert(2, 256, 8, seed=1).train()
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=generator)
    attention_mask = (torch.arange(args.seq)[None, :] < lengths[:, None]).long()
    batch = {
        "input_ids": torch.randint(1000, 30000, (args.batch, args.seq), generator=generator) * attention_mask,
        "attention_mask": attention_mask,
        "labels": torch.randint(0, 3, (args.batch,), generator=generator),
    }
    objective = Objective(kd_weight=0.5, hard_weight=0.5, temperature=2.0, matches=[
        Match(teacher="layer 3", student="layer 1", projection="linear"),
        Match(teacher="layer 6", student="layer 2", projection="linear"),
    ])  # fmt: skip
    distiller = Distiller(student, teacher, objective)
    module = distiller.setup(batch)
    weights = objective.weights(0, 1)
    counts = distiller.count_units(batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def student_step() -> None:
        logits = student(**inputs).logits
        token_cross_entropy(logits, batch["labels"]).backward()

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(**inputs)

    def distill_step() -> None:
        terms = distiller.compute_terms(module, batch, weights, 0, 1)
        normalized_loss(terms, weights, counts).backward()  # what the loop backpropagates

    cases = {"student": student_step, "teacher": teacher_forward, "distill": distill_step}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(args.rounds + 2):
        for name, fn in cases.items():
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_index >= 2:  # two warm-up rounds
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    overhead = median["distill"] / (median["student"] + median["teacher"])
    # per round ratios show the spread of the measurement
    per_round = [d / (s + t) for s, t, d in zip(times["student"], times["teacher"], times["distill"], strict=True)]
    quartiles = statistics.quantiles(per_round, n=4)
    lines = [
        "## Distillation step overhead (`bench/step_overhead.py`)",
        "",
        f"{machine_line()}; batch {args.batch}×{args.seq} tokens; teacher BERT 6×384 (22.7M), student BERT 2×256;",
        "KD on logits + 2 hidden-state matches with linear projections + hard CE; median of "
        f"{args.rounds} interleaved rounds.",
        "",
        "| (a) student fwd+bwd | (b) teacher fwd | (c) distillation step | overhead c/(a+b) | per-round IQR |",
        "|---|---|---|---|---|",
        f"| {median['student'] * 1e3:.1f} ms | {median['teacher'] * 1e3:.1f} ms | {median['distill'] * 1e3:.1f} ms "
        f"| **{overhead:.3f}** | {quartiles[0]:.3f}–{quartiles[2]:.3f} |",
        "",
        "Target: ≤ 1.10.",
    ]
    print("\n".join(lines))
    write_section("step_overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
