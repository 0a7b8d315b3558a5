"""A small distillation run driven by the command line, for tests that need separate processes.

    python train_script.py OUT --max-steps 12 [--save-every 2] [--resume] [--sleep 0.2] [--batch-size 4]

Writes the run into OUT (checkpoints, student/) and each rank's final student weights to OUT/rank-<r>.safetensors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import teacher_and_student, toy_examples

from kdistill.distillers import Distiller, Match, Objective
from kdistill.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)

    teacher, student = teacher_and_student()
    objective = Objective(
        kd_weight=0.7,
        hard_weight=0.3,
        temperature=2.0,
        matches=[
            Match(teacher="layer 4", student="layer 2", projection="linear"),
            Match(teacher="layer 3", student="layer 1", feature="attention", loss="attention_mse"),
        ],
    )
    distiller = Distiller(student, teacher, objective)
    if args.sleep:
        original = distiller.after_step

        def slow_after_step() -> None:
            original()
            time.sleep(args.sleep)

        distiller.after_step = slow_after_step
    config = TrainConfig(
        output_dir=args.out,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=3e-3,
        warmup_steps=2,
        save_every=args.save_every,
        keep_last=2,
        resume=args.resume,
        progress=False,
        log_with=(),
        seed=7,
    )
    train(distiller, toy_examples(40, seed=3), config)
    from accelerate import PartialState

    rank = PartialState().process_index
    state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    state.update({f"projection/{k}": v for k, v in distiller.projections_state().items()})
    save_file(state, str(Path(args.out) / f"rank-{rank}.safetensors"))


if __name__ == "__main__":
    main()
