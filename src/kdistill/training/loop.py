"""The training loop, on accelerate: one CPU, one GPU or many processes with the same code.

What it guarantees:

* gradient accumulation and data parallelism give the update of one large batch: every term is a sum over its
  units divided by the number of units in the whole optimizer step, counted before the forward passes, summed
  over the micro-batches and all-reduced over processes;
* the teacher is frozen, in eval mode, under ``torch.no_grad()``, cast to the run's dtype, never wrapped in DDP;
* checkpoints are atomic and hold everything needed for ``resume`` to end with the same weights as an
  uninterrupted run (same seed, CPU): model, projections, optimizer, scheduler, RNG of every rank, step and the
  position in the data;
* logs of every term, the learning rate and throughput go to ``metrics.jsonl``, TensorBoard and the progress bar.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from kdistill._io import keep_first_lines, records_up_to_step
from kdistill.data import PadCollator
from kdistill.distillers.objective import normalized_loss
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.training.checkpoint import (
    copy_atomically,
    latest_checkpoint,
    load_checkpoint,
    replace_dir,
    save_checkpoint,
    save_model_atomically,
)

EvalFn = Callable[[nn.Module], Mapping[str, float]]


@dataclass
class TrainConfig:
    """How to train. Every field has a default that suits a small run."""

    output_dir: str = "runs/distill"  # where checkpoints, logs, the final student and its projections go
    num_epochs: int = 1  # passes over the training data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps in total; overrides num_epochs
    batch_size: int = 16  # examples per micro-batch and process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 5e-5  # peak learning rate of the student
    projection_learning_rate: float | None = None  # learning rate of projections (default: learning_rate)
    optimizer: str = "adamw"  # "adamw", or "sgd" (momentum 0.9 unless sgd_momentum says otherwise)
    sgd_momentum: float = 0.9  # momentum of the sgd optimizer
    weight_decay: float = 0.01  # decoupled (AdamW) or L2 (SGD) weight decay, not on biases and norms
    lr_scheduler: str = "linear"  # any transformers.get_scheduler name: linear, cosine, constant, ...
    warmup_steps: int = 0  # learning-rate warm-up steps
    warmup_ratio: float = 0.0  # warm-up as a fraction of the total steps (used when warmup_steps is 0)
    max_grad_norm: float | None = 1.0  # gradient clipping; None turns it off
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (autocast; the teacher is cast to that dtype)
    seed: int = 42  # seeds python, numpy, torch and the data order
    log_every: int = 10  # optimizer steps between log lines
    eval_every: int | None = None  # optimizer steps between evaluations (and at each epoch end)
    save_every: int | None = None  # optimizer steps between checkpoints (and at each epoch end when set)
    keep_last: int = 2  # checkpoints kept
    metric_for_best: str | None = None  # evaluation metric that picks the best checkpoint
    greater_is_better: bool = True  # direction of metric_for_best
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    load_best_at_end: bool = True  # the saved final student is the best one when a metric is tracked
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    log_with: Sequence[str] = ("tensorboard",)  # accelerate trackers
    progress: bool = True  # a progress bar on the main process
    dataloader_drop_last: bool = False
    # batches of examples of similar length: each epoch's seeded permutation is cut into windows of 50 batches,
    # each window sorted by length and its batches shuffled (less padding, still a random order)
    group_by_length: bool = False
    # AdamW through torch's fused kernel (one pass over all parameters per step; the same update) when every trained
    # parameter is a float tensor on the CPU or a CUDA device and DeepSpeed does not own the optimizer
    fused_optimizer: bool = True

    def __post_init__(self) -> None:
        positive = ("num_epochs", "batch_size", "gradient_accumulation_steps", "log_every", "keep_last")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise InvalidArgumentError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        for name in ("max_steps", "eval_every", "save_every", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidArgumentError(f"{name} must be a positive integer or null, got {value!r}")
        if self.learning_rate <= 0:
            raise InvalidArgumentError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise InvalidArgumentError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise InvalidArgumentError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.early_stopping_patience is not None and self.metric_for_best is None:
            raise InvalidArgumentError("early_stopping_patience needs metric_for_best")


class EpochSampler(Sampler[int]):
    """A random permutation seeded by (seed, epoch): the data order depends on nothing else, so resume can skip.

    With ``lengths`` (and ``batch_size``), the permutation is grouped by length as Hugging Face's
    ``LengthGroupedSampler`` groups it: windows of 50 batches are sorted by length, cut into batches, and the
    batches of each window put in a seeded random order; a batch then pads to examples of about its own length.
    """

    WINDOW_BATCHES = 50

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        if lengths is not None and len(lengths) != size:
            raise InvalidArgumentError(f"{len(lengths)} lengths for {size} examples")
        self.lengths, self.batch_size = lengths, batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        lengths, size = self.lengths, self.batch_size
        grouped: list[int] = []
        window = size * self.WINDOW_BATCHES
        for start in range(0, len(order), window):
            part = sorted(order[start : start + window], key=lambda i: -lengths[i])
            batches = [part[i : i + size] for i in range(0, len(part), size)]
            for index in torch.randperm(len(batches), generator=generator).tolist():
                grouped += batches[index]
        return iter(grouped)

    def __len__(self) -> int:
        return self.size


def _example_length(example: Any) -> int:
    """An example's length in tokens: its (student's) ``input_ids``; 1 for anything without them."""
    if isinstance(example, Mapping):
        inner = example.get("student") if isinstance(example.get("student"), Mapping) else example
        ids = inner.get("input_ids")
        if ids is not None:
            return len(ids)
    return 1


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    student_dir: Path
    global_step: int
    best_metric: float | None
    best_step: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def _param_groups(module: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Student parameters with and without weight decay, and projections at their own learning rate."""
    decay, no_decay, projections = [], [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("projections."):
            projections.append(param)
        elif param.dim() < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "student"},
        {"params": no_decay, "weight_decay": 0.0, "name": "student_no_decay"},
    ]
    if projections:
        lr = cfg.projection_learning_rate or cfg.learning_rate
        groups.append({"params": projections, "weight_decay": cfg.weight_decay, "lr": lr, "name": "projections"})
    return [g for g in groups if g["params"]]


def _can_fuse(module: nn.Module, accelerator: Any) -> bool:
    """Whether torch's fused AdamW takes these parameters: float tensors on the CPU or CUDA, DeepSpeed not in use
    (it builds its own optimizer from ours)."""
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return False
    params = [p for p in module.parameters() if p.requires_grad]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _window(iterator: Iterator[Any], size: int) -> list[Any]:
    batch_list = []
    for _ in range(size):
        try:
            batch_list.append(next(iterator))
        except StopIteration:
            break
    return batch_list


def train(
    distiller: Any,
    train_data: Sequence[Any],
    config: TrainConfig,
    *,
    collate_fn: Callable[[list[Any]], Mapping[str, Any]] | None = None,
    eval_fn: EvalFn | None = None,
    accelerator: Any = None,
) -> TrainResult:
    """Train ``distiller``'s student on ``train_data``.

    Args:
        distiller: a :class:`~kdistill.distillers.Distiller` (or multi-teacher / multi-task / supervised one).
        train_data: an indexable dataset of examples; ``collate_fn`` turns a list of them into a batch dict.
        config: the run's :class:`TrainConfig`.
        eval_fn: called with the (unwrapped) student every ``eval_every`` steps and at each epoch end; returns
            metrics (the same on every process). ``config.metric_for_best`` picks among them.
        accelerator: an ``accelerate.Accelerator``; one is made from the config when None.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers import get_scheduler

    cfg = config
    if len(train_data) == 0:
        raise KdistillError("the training data is empty")
    output_dir = Path(cfg.output_dir)
    if accelerator is None:
        # accelerate keeps its mixed-precision settings process-wide; a second run in one process (a sweep, a test,
        # the demo's teacher then students) must be free to choose its own, so forget the previous run's settings.
        # The distributed state (PartialState) is kept.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        trackers = list(cfg.log_with) or None
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=trackers,
            project_dir=str(output_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    is_main = accelerator.is_main_process
    set_seed(cfg.seed)

    if collate_fn is None:
        from torch.utils.data import default_collate

        first = train_data[0]
        collate_fn = PadCollator() if isinstance(first, Mapping) and "input_ids" in first else default_collate
    lengths = [_example_length(example) for example in train_data] if cfg.group_by_length else None
    sampler = EpochSampler(len(train_data), cfg.seed, lengths=lengths, batch_size=cfg.batch_size)
    loader = DataLoader(
        train_data,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=cfg.dataloader_drop_last,
        # its own generator: starting an epoch's iterator (at a resume, mid-epoch) draws nothing from the global
        # one, so the dropout masks after a resume are those of the uninterrupted run
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    sample_batch = collate_fn([train_data[i] for i in range(min(cfg.batch_size, len(train_data)))])
    teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    module = distiller.setup(sample_batch, accelerator.device, teacher_dtype)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(_param_groups(module, cfg), lr=cfg.learning_rate, momentum=cfg.sgd_momentum)
    else:
        fused = cfg.fused_optimizer and _can_fuse(module, accelerator)
        optimizer = torch.optim.AdamW(_param_groups(module, cfg), lr=cfg.learning_rate, fused=fused or None)

    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    steps_per_epoch = max(math.ceil(len(loader) / cfg.gradient_accumulation_steps), 1)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    if hasattr(distiller, "objective"):
        distiller.objective.check_schedules(total_steps)

    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "best_metric": None,
        "best_step": None,
        "bad_evals": 0,
        "total_steps": total_steps,
        "logged": 0,  # records in metrics.jsonl: a resume keeps these and drops those written after the checkpoint
    }
    unwrapped = accelerator.unwrap_model(module)
    extras = {"ema_teacher": distiller.teachers[0]} if getattr(distiller, "teacher_mode", "") == "ema" else {}
    if cfg.resume:
        path = latest_checkpoint(output_dir)
        if path is not None:
            state = load_checkpoint(
                path,
                student=unwrapped.student,
                projections=unwrapped.projections if hasattr(distiller, "_projection_keys") else None,
                projection_names=getattr(distiller, "_projection_keys", {}),
                optimizer=optimizer,
                scheduler=scheduler,
                extras=extras,
                rank=accelerator.process_index,
            )
            accelerator.print(f"resumed from {path} at step {state['step']}")
    elif is_main and (output_dir / "checkpoints").is_dir() and any((output_dir / "checkpoints").iterdir()):
        raise KdistillError(f"{output_dir} already holds checkpoints; pass resume=True or choose another output_dir")

    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    if cfg.log_with:
        accelerator.init_trackers(
            "tensorboard", config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
        )
    metrics_file = output_dir / "metrics.jsonl"
    if is_main:  # the records up to the checkpoint resumed from (none on a fresh start) are the log's beginning
        state.setdefault("logged", records_up_to_step(metrics_file, state["step"]))  # a checkpoint that did not count
        keep_first_lines(metrics_file, state["logged"])
    history: list[dict[str, Any]] = []
    world = accelerator.num_processes
    progress = None
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        label = "train" if getattr(distiller, "teacher_mode", "") == "none" else "distill"  # no teacher: plain
        progress = tqdm(total=total_steps, initial=state["step"], desc=label, dynamic_ncols=True)

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        state["logged"] = int(state.get("logged", 0)) + 1
        if is_main:
            with open(metrics_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if cfg.log_with:
                accelerator.log(
                    {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                    step=record["step"],
                )

    def checkpoint() -> None:
        save_checkpoint(
            output_dir,
            state["step"],
            student=unwrapped.student,
            projections=distiller.projections_state() if hasattr(distiller, "projections_state") else {},
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state=state,
            extras=extras,
            keep_last=cfg.keep_last,
            rank=accelerator.process_index,
            is_main=is_main,
            barrier=accelerator.wait_for_everyone,
        )

    def evaluate() -> bool:
        """Run eval_fn, track the best student; returns True when early stopping says stop."""
        if eval_fn is None:
            return False
        module.eval()
        with torch.no_grad():
            metrics = {f"eval/{k}": float(v) for k, v in eval_fn(unwrapped.student).items()}
        module.train()
        log({"step": state["step"], "epoch": state["epoch"], **metrics})
        if cfg.metric_for_best is None:
            return False
        key = f"eval/{cfg.metric_for_best}"
        if key not in metrics:
            raise KdistillError(f"metric_for_best {cfg.metric_for_best!r} is not among the metrics {sorted(metrics)}")
        value, best = metrics[key], state["best_metric"]
        improved = best is None or (value > best if cfg.greater_is_better else value < best)
        if improved:
            state.update(best_metric=value, best_step=state["step"], bad_evals=0)
            if is_main:
                save_model_atomically(
                    output_dir / "best", unwrapped.student, distiller, {"step": state["step"], key: value}
                )
        else:
            state["bad_evals"] += 1
        accelerator.wait_for_everyone()
        patience = cfg.early_stopping_patience
        return patience is not None and state["bad_evals"] >= patience

    module.train()
    stopped_early = False
    running: dict[str, float] = {}
    running_steps, window_start, examples_seen = 0, time.perf_counter(), 0.0
    while state["step"] < total_steps and state["epoch"] < num_epochs and not stopped_early:
        sampler.set_epoch(state["epoch"])
        skip = state["batch_in_epoch"]
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        if hasattr(epoch_loader, "set_epoch"):  # accelerate re-sets the sampler's epoch from its own counter
            epoch_loader.set_epoch(state["epoch"])
        iterator = iter(epoch_loader)
        while state["step"] < total_steps:
            window = _window(iterator, cfg.gradient_accumulation_steps)
            if not window:
                break
            counts = _global_counts(distiller, window, accelerator)
            weights = (
                distiller.objective.weights(state["step"], total_steps) if hasattr(distiller, "objective") else None
            )
            term_logs: dict[str, float] = {}
            for index, batch in enumerate(window):
                sync = index == len(window) - 1
                context = contextlib.nullcontext() if sync else accelerator.no_sync(module)
                with context:
                    with accelerator.autocast():
                        terms = distiller.compute_terms(module, batch, weights, state["step"], total_steps)
                        loss = normalized_loss(terms, weights, counts, world_size=world)
                    accelerator.backward(loss)
                for name, term in terms.items():
                    term_logs[name] = term_logs.get(name, 0.0) + float(term.total.detach()) / max(
                        counts[term.unit], 1.0
                    )
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
            optimizer.step()
            step_lr = scheduler.get_last_lr()[0]  # the rate this step used (logged as the Trainer logs it)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(distiller, "after_step"):
                distiller.after_step()
            state["step"] += 1
            state["batch_in_epoch"] += len(window)
            examples_seen += counts.get("examples", 0.0)
            term_logs = _reduce_logs(term_logs, accelerator)
            loss_value = sum(weights.get(name, 0.0) * value for name, value in term_logs.items()) if weights else 0.0
            for name, value in {"loss": loss_value, **term_logs}.items():
                running[name] = running.get(name, 0.0) + value
            running_steps += 1
            if progress is not None:
                progress.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                record = {"step": state["step"], "epoch": state["epoch"], "lr": step_lr}
                record.update({f"train/{k}": v / running_steps for k, v in running.items()})
                record.update({f"weight/{k}": v for k, v in (weights or {}).items()})
                record["samples_per_second"] = examples_seen / elapsed
                log(record)
                if progress is not None:
                    progress.set_postfix(
                        loss=f"{record['train/loss']:.4f}",
                        lr=f"{record['lr']:.2e}",
                        sps=f"{record['samples_per_second']:.1f}",
                    )
                running, running_steps, window_start, examples_seen = {}, 0, time.perf_counter(), 0.0
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and evaluate():
                stopped_early = True
            if cfg.save_every and state["step"] % cfg.save_every == 0:
                checkpoint()
            if stopped_early:
                break
        if stopped_early or (state["step"] >= total_steps and state["batch_in_epoch"] < len(loader)):
            break
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        if not (cfg.eval_every and state["step"] % cfg.eval_every == 0) and evaluate():
            stopped_early = True
        if cfg.save_every:
            checkpoint()
    if progress is not None:
        progress.close()

    student_dir = output_dir / "student"
    if is_main:
        best_dir = output_dir / "best"
        if cfg.load_best_at_end and cfg.metric_for_best and (best_dir / "student").is_dir():
            replace_dir(best_dir / "student", student_dir)
            best_proj = best_dir / "projections.safetensors"
            if best_proj.is_file():
                copy_atomically(best_proj, output_dir / "projections.safetensors")
        else:
            save_model_atomically(output_dir, unwrapped.student, distiller, None, student_subdir="student")
        summary = {
            "global_step": state["step"],
            "best_metric": state["best_metric"],
            "best_step": state["best_step"],
            "stopped_early": stopped_early,
        }
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    if cfg.log_with:
        accelerator.end_training()
    return TrainResult(
        output_dir, student_dir, state["step"], state["best_metric"], state["best_step"], history, stopped_early
    )


def _global_counts(distiller: Any, window: list[Any], accelerator: Any) -> dict[str, float]:
    """Units of each kind in the whole optimizer step: summed over micro-batches, all-reduced over processes."""
    totals: dict[str, float] = {}
    for batch in window:
        for unit, count in distiller.count_units(batch).items():
            totals[unit] = totals.get(unit, 0.0) + count
    if accelerator.num_processes > 1:
        keys = sorted(totals)
        tensor = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=accelerator.device)
        tensor = accelerator.reduce(tensor, reduction="sum")
        totals = dict(zip(keys, tensor.tolist(), strict=True))
    return totals


def _reduce_logs(logs: dict[str, float], accelerator: Any) -> dict[str, float]:
    """Each process holds its share of the global mean; the sum over processes is the mean of the step."""
    if accelerator.num_processes == 1 or not logs:
        return logs
    keys = sorted(logs)
    tensor = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    tensor = accelerator.reduce(tensor, reduction="sum")
    return dict(zip(keys, tensor.tolist(), strict=True))
