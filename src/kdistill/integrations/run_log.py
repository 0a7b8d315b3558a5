"""The engine's log format for ``DistillationTrainer`` runs: ``metrics.jsonl`` records, TensorBoard, a quiet bar.

:class:`RunLogCallback` turns the Trainer's logs into the records kdistill's loop writes (``training/loop.py``), so a
causal-LM run directory reads the same on both backends (``kdistill report`` and ``experiment`` read either):

* training: ``{"step", "epoch" (0-based), "lr", "train/loss", "train/kd", "train/hard", "weight/kd", "weight/hard"}`` —
  ``train/loss`` the optimized total, ``train/<term>`` each term's mean per unit as the loss uses it (the KD term
  × T² when ``t2_scaling`` is on), ``weight/<term>`` its weight at that step, ``samples_per_second`` from the
  nominal examples per step (batch × accumulation × processes; a short last batch counts as full);
* evaluation: ``{"step", "eval/<metric>"}``.

The same numbers go to TensorBoard under ``<run>/tensorboard`` (where the engine's accelerate tracker writes) when
asked. :class:`QuietProgressCallback` keeps the Trainer's progress bar but shows the loss on it instead of printing
each log's Python dict.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from kdistill._io import keep_first_lines, records_up_to_step
from kdistill.distillers.objective import Objective
from kdistill.integrations.trainer import DistillationTrainer


class RunLogCallback(TrainerCallback):
    """Append the engine's records to ``run_dir/metrics.jsonl`` (and TensorBoard) from the Trainer's logs.

    Args:
        run_dir: the run directory.
        objective: the run's objective (the weights and temperature of each step).
        tensorboard: also write the records as TensorBoard scalars under ``run_dir/tensorboard``.
    """

    def __init__(self, run_dir: str | Path, objective: Objective, *, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.objective = objective
        self.tensorboard = tensorboard
        self._writer: Any = None
        self._last = (0, time.perf_counter())  # the step and time of the latest training record
        self.samples_per_step = 1  # examples per optimizer step (set from the arguments at train begin)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self._last = (state.global_step, time.perf_counter())
        if state.is_world_process_zero:  # a resume keeps the records up to its checkpoint; a fresh run starts anew
            log_file = self.run_dir / "metrics.jsonl"
            keep_first_lines(log_file, records_up_to_step(log_file, state.global_step))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = self.record(state, logs)
        if record is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self._scalars(record)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def record(self, state: TrainerState, logs: dict[str, float]) -> dict[str, Any] | None:
        """The engine's record for one Trainer log (None for the Trainer's end-of-training summary)."""
        step = state.global_step
        if "loss" in logs:  # a training log
            total = max(state.max_steps, step, 1)
            # the engine's epoch: the 0-based index of the epoch this step belongs to (the Trainer's is a fraction)
            epoch = float(logs.get("epoch", state.epoch) or 0.0)
            record: dict[str, Any] = {"step": step, "epoch": max(math.ceil(epoch - 1e-9) - 1, 0)}
            record["lr"] = logs.get("learning_rate")
            record["train/loss"] = logs["loss"]
            temperature = float(self.objective.temperature(max(step - 1, 0), total))
            t2 = temperature**2 if self.objective.t2_scaling else 1.0
            if "kd_loss" in logs:
                record["train/kd"] = logs["kd_loss"] * t2
            if "ce_loss" in logs:
                record["train/hard"] = logs["ce_loss"]
            weights = self.objective.weights(max(step - 1, 0), total)
            record.update({f"weight/{name}": value for name, value in weights.items() if name in ("kd", "hard")})
            last_step, last_time = self._last
            elapsed = max(time.perf_counter() - last_time, 1e-9)
            record["samples_per_second"] = (step - last_step) * self.samples_per_step / elapsed
            self._last = (step, time.perf_counter())
            return record
        evaluated = {key.removeprefix("eval_"): v for key, v in logs.items() if key.startswith("eval_")}
        if evaluated:
            return {"step": step, **{f"eval/{key}": value for key, value in evaluated.items()}}
        return None

    def _scalars(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is optional: imported when asked

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, record["step"])


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with the latest loss on it instead of each log's dict printed below it."""

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0.0):.2e}")


def use_run_log(trainer: DistillationTrainer, run_dir: str | Path, *, tensorboard: bool, progress: bool) -> None:
    """Give a ``DistillationTrainer`` the engine's logs: :class:`RunLogCallback` in place of the Trainer's printer,
    and :class:`QuietProgressCallback` (when ``progress``) in place of its progress bar."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(QuietProgressCallback)
    trainer.add_callback(RunLogCallback(run_dir, trainer.objective, tensorboard=tensorboard))
