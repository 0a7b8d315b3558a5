"""How fast and how big a model is: latency, throughput, parameter count and size on disk.

Every measurement runs the model in eval mode under ``torch.no_grad()`` (its previous mode is restored after),
times with :func:`time.perf_counter` and, on CUDA, synchronizes the device around each timed forward. Latency is per
batch, in milliseconds; on a CPU shared with other processes expect noise of a few percent, so compare p50s measured
in one run rather than numbers from different runs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.core.batch import model_inputs
from kdistill.errors import InvalidArgumentError

__all__ = [
    "count_parameters",
    "cpu_contention",
    "evaluating",
    "measure_latencies",
    "measure_latency",
    "measure_throughput",
    "prepare_inputs",
    "ratio_spread",
    "size_on_disk",
    "watching_cpu",
]


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def prepare_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``inputs`` that ``model.forward`` takes (labels dropped), moved to the model's device.

    Args:
        model: the model to run.
        inputs: a batch's inputs for this model (``input_ids`` ``(B, T)``, ``attention_mask`` ``(B, T)``, ...).

    Returns:
        Keyword arguments for ``model(**kwargs)``.
    """
    device = _model_device(model)
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in model_inputs(model, inputs).items()
    }


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``torch.no_grad()`` for the block; the model's previous train/eval mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    if int(threads) != threads or threads < 1:
        raise InvalidArgumentError(f"threads must be a positive integer or None, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (NumPy's default), ``q`` in [0, 100]."""
    rank = (len(sorted_values) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def _check_count(name: str, value: int, minimum: int) -> None:
    if int(value) != value or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")


def measure_latency(
    model: nn.Module,
    example_batch: Mapping[str, Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
) -> dict[str, float]:
    """Time ``repeats`` forwards of one batch after ``warmup`` untimed ones.

    Args:
        model: the model; run in eval mode without gradients, its mode restored after.
        example_batch: the model's inputs (filtered by :func:`prepare_inputs`, so labels may stay in).
        warmup: untimed forwards first (allocator, lazy initialization, caches).
        repeats: timed forwards, >= 1.
        threads: CPU threads for the measurement (``torch.set_num_threads``, restored after); None keeps the
            current setting.

    Returns:
        ``{"p50_ms", "p90_ms", "mean_ms", "min_ms"}`` per batch forward, and ``"repeats"``.
    """
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    device = _model_device(model)
    inputs = prepare_inputs(model, example_batch)
    timings_ms: list[float] = []
    with _torch_threads(threads), evaluating(model):
        for _ in range(warmup):
            model(**inputs)
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            model(**inputs)
            _synchronize(device)
            timings_ms.append((time.perf_counter() - start) * 1000.0)
    timings_ms.sort()
    return {
        "p50_ms": _percentile(timings_ms, 50),
        "p90_ms": _percentile(timings_ms, 90),
        "mean_ms": sum(timings_ms) / len(timings_ms),
        "min_ms": timings_ms[0],
        "repeats": float(repeats),
    }


def measure_latencies(
    models: Mapping[str, tuple[nn.Module, Mapping[str, Any]]],
    *,
    warmup: int = 3,
    min_repeats: int = 10,
    max_repeats: int = 200,
    budget_s: float = 4.0,
    threads: int | None = None,
) -> tuple[dict[str, dict[str, float]], list[dict[str, float]]]:
    """Time several models on their inputs interleaved: each round runs one forward of every model, in an order
    that rotates, so a burst of load from elsewhere falls on all of them alike and the ratios stay fair.

    Rounds repeat until every model has ``min_repeats`` forwards and either ``budget_s`` seconds have passed or
    ``max_repeats`` rounds are done (adaptive: fast models get more repeats within the budget).

    Args:
        models: name → (model, its inputs); each run in eval mode without gradients.
        warmup: untimed forwards of each model first.

    Returns:
        Per model ``{"p50_ms", "p90_ms", "mean_ms", "min_ms", "iqr_pct", "repeats"}`` (``iqr_pct``: the
        interquartile range as a percentage of the median, the spread), and each round's times ``{name: ms}``.
    """
    _check_count("warmup", warmup, 0)
    _check_count("min_repeats", min_repeats, 1)
    _check_count("max_repeats", max_repeats, min_repeats)
    names = list(models)
    prepared = {name: (model, prepare_inputs(model, inputs)) for name, (model, inputs) in models.items()}
    rounds: list[dict[str, float]] = []
    with _torch_threads(threads), contextlib.ExitStack() as stack:
        for model, _ in prepared.values():
            stack.enter_context(evaluating(model))
        for _ in range(warmup):
            for model, inputs in prepared.values():
                model(**inputs)
        started = time.perf_counter()
        while len(rounds) < max_repeats and (len(rounds) < min_repeats or time.perf_counter() - started < budget_s):
            shift = len(rounds) % len(names)
            timings: dict[str, float] = {}
            for name in names[shift:] + names[:shift]:
                model, inputs = prepared[name]
                device = _model_device(model)
                _synchronize(device)
                start = time.perf_counter()
                model(**inputs)
                _synchronize(device)
                timings[name] = (time.perf_counter() - start) * 1000.0
            rounds.append(timings)
    stats: dict[str, dict[str, float]] = {}
    for name in names:
        values = sorted(timing[name] for timing in rounds)
        p50 = _percentile(values, 50)
        stats[name] = {
            "p50_ms": p50,
            "p90_ms": _percentile(values, 90),
            "mean_ms": sum(values) / len(values),
            "min_ms": values[0],
            "iqr_pct": 100.0 * (_percentile(values, 75) - _percentile(values, 25)) / max(p50, 1e-12),
            "repeats": float(len(values)),
        }
    return stats, rounds


def ratio_spread(rounds: Sequence[Mapping[str, float]], numerator: str, denominator: str) -> dict[str, float]:
    """The per-round ratio ``numerator / denominator`` (a speed-up when the numerator is the reference's time):
    its median and its interquartile range ``p25``, ``p75`` over the interleaved rounds."""
    ratios = sorted(timing[numerator] / max(timing[denominator], 1e-12) for timing in rounds)
    return {"p50": _percentile(ratios, 50), "p25": _percentile(ratios, 25), "p75": _percentile(ratios, 75)}


def _cpu_busy_seconds() -> float | None:
    """CPU seconds every process has used since boot, from ``/proc/stat`` (None where the system has none)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(value) for value in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def watching_cpu() -> Iterator[dict[str, float]]:
    """For the block: the share of the machine's cores that other processes used (``others_share``, 0..1), from the
    system's busy time less this process's own CPU time, over the block's wall time (absent where unknown)."""
    usage: dict[str, float] = {}
    busy, own, wall = _cpu_busy_seconds(), time.process_time(), time.perf_counter()
    try:
        yield usage
    finally:
        after = _cpu_busy_seconds()
        elapsed = time.perf_counter() - wall
        if busy is not None and after is not None and elapsed > 0:
            others = (after - busy) - (time.process_time() - own)
            usage["others_share"] = max(others, 0.0) / (elapsed * (os.cpu_count() or 1))


def cpu_contention(others_share: float | None, limit: float = 0.15) -> str | None:
    """A warning when other processes used more than ``limit`` of the cores while models were timed (from
    :func:`watching_cpu`): their latencies and speed-ups are then unreliable. None when quiet or unknown."""
    if others_share is None or others_share <= limit:
        return None
    return (
        f"other processes used {100 * others_share:.0f}% of the {os.cpu_count() or 1} CPU cores while the models "
        "were timed: latencies and speed-ups may be off; measure on a quiet machine"
    )


def _batch_size(inputs: Mapping[str, Any]) -> int:
    for key in ("input_ids", "attention_mask", "inputs_embeds"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise InvalidArgumentError(f"cannot tell the batch size: the inputs hold no tensor (keys: {sorted(inputs)})")


def measure_throughput(model: nn.Module, batches: Sequence[Mapping[str, Any]], warmup: int = 1) -> float:
    """Examples per second over one timed pass through ``batches``, after ``warmup`` untimed forwards of the first.

    Args:
        model: the model; run in eval mode without gradients, its mode restored after.
        batches: the model's inputs per batch; the batch size is read from ``input_ids`` (or the first tensor).
        warmup: untimed forwards of the first batch.

    Returns:
        Examples per second (a float).
    """
    _check_count("warmup", warmup, 0)
    if not batches:
        raise InvalidArgumentError("measure_throughput needs at least one batch, got none")
    device = _model_device(model)
    prepared = [prepare_inputs(model, batch) for batch in batches]
    examples = sum(_batch_size(inputs) for inputs in prepared)
    with evaluating(model):
        for _ in range(warmup):
            model(**prepared[0])
        _synchronize(device)
        start = time.perf_counter()
        for inputs in prepared:
            model(**inputs)
        _synchronize(device)
        elapsed = time.perf_counter() - start
    return examples / max(elapsed, 1e-9)


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or frozen; a tensor shared by several modules (tied embeddings) counts once."""
    return sum(parameter.numel() for parameter in model.parameters())


def size_on_disk(path: str | Path | None = None, model: nn.Module | None = None) -> int:
    """Bytes a model takes on disk.

    Args:
        path: a saved model: a directory (every file under it, recursively, is counted) or a single file.
        model: used when ``path`` is None: the size of its state dict serialized as safetensors
            (``safetensors.torch.save_model``, which stores tied weights once), written to a temporary file.

    Returns:
        The size in bytes.

    Raises:
        InvalidArgumentError: ``path`` does not exist, or neither ``path`` nor ``model`` is given.
    """
    if path is not None:
        target = Path(path)
        if target.is_file():
            return target.stat().st_size
        if not target.is_dir():
            raise InvalidArgumentError(f"size_on_disk: path {str(target)!r} does not exist")
        return sum(file.stat().st_size for file in target.rglob("*") if file.is_file())
    if model is None:
        raise InvalidArgumentError("size_on_disk needs a path or a model, got neither")
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="kdistill-size-") as directory:
        file = os.path.join(directory, "model.safetensors")
        save_model(model, file, force_contiguous=True)
        return os.path.getsize(file)
