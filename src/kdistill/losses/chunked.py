"""A logit divergence computed from hidden states and LM heads, chunk by chunk, without the full ``(N, V)`` logits.

For LLM distillation the logits are the memory problem: N = 4096 positions × V = 128k entries is 2 GiB per float32
buffer, and a plain divergence with its backward keeps several of them alive at once. :func:`chunked_divergence`
takes what comes *before* the LM head instead and walks the counted positions in chunks. For each chunk it computes
the student's and teacher's logits, the divergence (the registered function itself, with ``reduction="sum"``), and
the gradient with respect to those logits, which it turns at once into gradients for the hidden states, the head
weight (accumulated in place) and the bias. The backward pass then only scales and hands back what the forward pass
stored, so no ``(N, V)`` tensor exists in either pass, and the divergence is computed once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from kdistill.errors import InvalidArgumentError, ShapeMismatchError, VocabMismatchError
from kdistill.losses._common import (
    VOCAB_POLICIES,
    check_mask,
    check_reduction,
    check_temperature,
    compute_dtype,
)
from kdistill.losses._lookup import LOSSES

DivergenceFn = Callable[..., torch.Tensor]

_REDUCTIONS: tuple[str, ...] = ("mean", "sum", "batchmean")
# On CPU the divergence runs on slices of a chunk whose float32 (rows, V) tensors take at most this many bytes: a
# divergence with its backward makes about 15 such temporaries, and at this size they stay in the CPU caches and in
# memory the allocator reuses; chunk-sized ones (256 MiB at 512 × 128k) went to DRAM and drew fresh pages from the
# kernel on every call. Measured here (bench/losses.py, 2 cores): 2 MiB slices against 32 MiB ones cut the peak memory
# from 923 to 261 MiB at V = 32k and from 1.6 to 0.9 GiB at V = 128k, and the time by 5–10%. The LM-head products
# still run on whole chunks, where matrix multiplication is efficient.
_CPU_SLICE_BYTES = 2 * 2**20


def chunked_divergence(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    divergence: str | DivergenceFn = "forward_kl",
    chunk_size: int = 1024,
    temperature: float | torch.Tensor = 1.0,
    reduction: str = "mean",
    vocab_policy: str = "error",
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    **divergence_kwargs: Any,
) -> torch.Tensor:
    """A divergence between the student's and teacher's LM-head outputs, computed ``chunk_size`` positions at a time.

    Equivalent to ``divergence(student_hidden @ student_head_weight.T (+ student_head_bias),
    teacher_hidden @ teacher_head_weight.T (+ teacher_head_bias), mask, temperature=..., reduction=...,
    vocab_policy=..., **divergence_kwargs)``: values and gradients equal that plain path up to float rounding (the
    logits are computed in the input dtype, as ``h @ W.T`` would, and the divergence upcasts them). Uncounted
    positions are dropped before any LM-head product, so they cost nothing.

    Memory: two ``chunk_size × V`` buffers (each side's logits, then their gradient) and the divergence's own
    temporaries for one chunk (on CPU, for a slice of it of at most 2 MiB per temporary), plus a float32 (float64 for
    float64 inputs) ``V × H`` accumulator for each head weight that requires grad and ``n_counted × H`` for each hidden
    state that does; never the ``(N, V)`` logits, in the forward or the backward pass.

    Args:
        student_hidden: ``(..., H_s)``, the student's last hidden states (input of its LM head).
        student_head_weight: ``(V_s, H_s)``, the student's LM-head weight in ``nn.Linear`` layout.
        teacher_hidden: ``(..., H_t)`` with the same leading shape as ``student_hidden``.
        teacher_head_weight: ``(V_t, H_t)``.
        mask: bool ``(...)``, True = counted; None counts every position.
        divergence: a name registered in :data:`~kdistill.losses.LOSSES` with kind ``"divergence"`` or a callable
            following the divergence contract of :mod:`kdistill.losses.divergences`. It is called on each chunk's
            logits (on CPU, on slices of the chunk) with ``mask=None`` and ``reduction="sum"``; the tensors it gets
            are reused afterwards, so it must not keep them.
        chunk_size: positions per LM-head product (a positive int). Larger chunks make the matrix products more
            efficient and cost ``chunk_size × V`` memory each; 256–1024 suit V of 32k–128k.
        temperature: both logits are divided by it before the softmax: a number, or a tensor ``(...)`` of
            per-position temperatures (as the ``flsw``/``cwsm`` schedules give). It is not differentiated.
        reduction: ``"mean"`` over counted positions (0 when none count), ``"sum"`` or ``"batchmean"`` (sum / size of
            dim 0 of the leading shape). ``"none"`` is not supported here.
        vocab_policy: ``"error"``, ``"truncate"`` or ``"pad"`` when ``V_s != V_t`` (applied by the divergence).
        student_head_bias: optional ``(V_s,)``.
        teacher_head_bias: optional ``(V_t,)``.
        **divergence_kwargs: passed to the divergence, e.g. ``skew`` or ``beta``.

    Returns:
        A 0-d float32 tensor (float64 for float64 inputs), in the divergence's units (nats for the KL family).
        Gradients flow to every input that requires grad, including the teacher's (self-distillation).

    Raises:
        InvalidArgumentError: ``reduction="none"``, a bad ``chunk_size``, ``temperature`` or ``vocab_policy``, a
            name that is not a divergence, or mixed dtypes within one head.
        ShapeMismatchError: a hidden size that does not match its head, differing leading shapes, a bad bias, mask
            or temperature tensor.
        VocabMismatchError: ``V_s != V_t`` with ``vocab_policy="error"``.
    """
    loss_fn = _resolve_divergence(divergence)
    _check_options(chunk_size, reduction, vocab_policy)
    _check_head("student", student_hidden, student_head_weight, student_head_bias)
    _check_head("teacher", teacher_hidden, teacher_head_weight, teacher_head_bias)
    leading_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading_shape:
        raise ShapeMismatchError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "differ before the hidden dimension"
        )
    student_vocab, teacher_vocab = student_head_weight.shape[0], teacher_head_weight.shape[0]
    if student_vocab != teacher_vocab and vocab_policy == "error":
        raise VocabMismatchError(
            f"student vocabulary has {student_vocab} entries (student_head_weight rows) but teacher vocabulary has "
            f"{teacher_vocab}; choose vocab_policy='truncate' or 'pad' if token ids agree on the shared part, "
            "or a cross-tokenizer method if they do not"
        )
    mask = check_mask(mask, leading_shape, what="hidden states")
    check_temperature(temperature, leading_shape)

    counted_index = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)  # (n_counted,)
    n_counted = leading_shape.numel() if counted_index is None else counted_index.numel()
    if reduction == "mean":
        divisor = max(n_counted, 1)
    elif reduction == "batchmean":
        divisor = max(leading_shape[0] if len(leading_shape) > 0 else 1, 1)
    else:
        divisor = 1
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach()
        if temperature.dim() > 0:  # per position: keep the counted ones, in the order of the counted rows
            temperature = _counted_rows(temperature[..., None], counted_index).squeeze(1)  # (n_counted,)
    plan = _Plan(
        loss_fn=loss_fn,
        chunk_size=chunk_size,
        divisor=divisor,
        temperature=temperature,
        loss_kwargs={"vocab_policy": vocab_policy, **divergence_kwargs},
    )
    inputs = (
        student_hidden,
        student_head_weight,
        student_head_bias,
        teacher_hidden,
        teacher_head_weight,
        teacher_head_bias,
    )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _ChunkedDivergence.apply(*inputs, counted_index, plan)
    with torch.no_grad():  # evaluation: values only, no gradient work
        student = _Head(_counted_rows(student_hidden, counted_index), student_head_weight, student_head_bias)
        teacher = _Head(_counted_rows(teacher_hidden, counted_index), teacher_head_weight, teacher_head_bias)
        return _run_chunks(student, teacher, plan)


# ---------------------------------------------------------------- the chunk loop


@dataclass
class _Plan:
    """What every chunk needs besides the tensors."""

    loss_fn: DivergenceFn  # the divergence, called per chunk (or slice of one) with reduction="sum"
    chunk_size: int  # counted positions per chunk
    divisor: int  # the reduction: the summed loss is divided by it (1 for "sum")
    temperature: float | torch.Tensor  # a number, a 0-d tensor, or (n_counted,) per counted row
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # vocab_policy, skew, beta, ...

    def temperature_of(self, first: int, last: int) -> float | torch.Tensor:
        """The temperature argument for counted rows ``first:last``."""
        per_row = isinstance(self.temperature, torch.Tensor) and self.temperature.dim() > 0
        return self.temperature[first:last] if per_row else self.temperature  # type: ignore[index]


class _Head:
    """One side's LM head over the counted rows, with accumulators for the gradients its inputs need."""

    def __init__(
        self,
        rows: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        needs_grad: tuple[bool, bool, bool] = (False, False, False),
    ) -> None:
        self.rows = rows  # (n_counted, H)
        self.weight = weight  # (V, H)
        self.bias = bias  # (V,) or None
        self.accumulate_dtype = compute_dtype(weight)  # float32, or float64 for float64 inputs
        needs_rows, needs_weight, needs_bias = needs_grad
        zeros = {"dtype": self.accumulate_dtype, "device": weight.device}
        self.grad_rows = torch.zeros(rows.shape, **zeros) if needs_rows else None  # (n_counted, H)
        self.grad_weight = torch.zeros(weight.shape, **zeros) if needs_weight else None  # (V, H)
        self.grad_bias = torch.zeros(weight.shape[0], **zeros) if needs_bias and bias is not None else None  # (V,)
        self.requires_grad = any(g is not None for g in (self.grad_rows, self.grad_weight, self.grad_bias))

    def logits_buffer(self, rows: int) -> torch.Tensor:
        """A ``(rows, V)`` buffer every chunk's logits are written into: fresh memory costs page faults each time."""
        return self.weight.new_empty(rows, self.weight.shape[0])

    def logits(self, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """The chunk's logits ``(stop - start, V)`` in the input dtype, as ``h @ W.T (+ b)`` computes them."""
        out = buffer[: stop - start]
        if self.bias is None:
            torch.mm(self.rows[start:stop], self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, self.rows[start:stop], self.weight.t(), out=out)
        return out.detach()  # a new leaf on the buffer's memory, so that its gradient can be asked for

    def accumulate(self, start: int, stop: int, grad_logits: torch.Tensor) -> None:
        """Turn the chunk's gradient w.r.t. its logits ``(stop - start, V)`` into the inputs' gradients."""
        if self.grad_rows is not None:
            grad_rows = self.grad_rows[start:stop]  # (chunk, H), contiguous rows of the buffer
            if grad_logits.dtype == grad_rows.dtype:
                torch.mm(grad_logits, self.weight, out=grad_rows)
            else:  # bf16/fp16: the product in the input dtype, as the plain backward computes it
                grad_rows.copy_(torch.mm(grad_logits, self.weight))
        if self.grad_weight is not None:
            rows = self.rows[start:stop]
            if grad_logits.dtype != self.accumulate_dtype:  # bf16/fp16: accumulate the products in float32
                grad_logits, rows = grad_logits.to(self.accumulate_dtype), rows.to(self.accumulate_dtype)
            self.grad_weight.addmm_(grad_logits.t(), rows)  # (V, chunk) @ (chunk, H)
        if self.grad_bias is not None:
            self.grad_bias.add_(grad_logits.sum(0, dtype=self.accumulate_dtype))


def _run_chunks(student: _Head, teacher: _Head, plan: _Plan) -> torch.Tensor:
    """The reduced loss over all counted rows; fills the heads' gradient accumulators on the way."""
    n_counted = student.rows.shape[0]
    chunk_rows = min(plan.chunk_size, n_counted)
    slice_rows = _slice_rows(chunk_rows, student, teacher)
    # Written by every chunk's LM-head product, then overwritten by the gradient w.r.t. those logits.
    student_buffer = student.logits_buffer(chunk_rows)  # (chunk, V_s)
    teacher_buffer = teacher.logits_buffer(chunk_rows)  # (chunk, V_t)
    total: torch.Tensor | None = None
    # With nothing counted, one empty chunk still runs: the divergence validates its arguments and returns a zero
    # of its own dtype.
    for start in range(0, max(n_counted, 1), plan.chunk_size):
        stop = min(start + plan.chunk_size, n_counted)
        with torch.no_grad():
            student_logits = student.logits(start, stop, student_buffer)  # (chunk, V_s)
            teacher_logits = teacher.logits(start, stop, teacher_buffer)  # (chunk, V_t)
        for first in range(0, max(stop - start, 1), slice_rows):
            last = min(first + slice_rows, stop - start)
            slice_loss = _divergence_slice(
                plan,
                student_logits[first:last],
                teacher_logits[first:last],
                plan.temperature_of(start + first, start + last),
                student.requires_grad,
                teacher.requires_grad,
            )
            total = slice_loss if total is None else total + slice_loss
        with torch.no_grad():
            for head, grad_logits in ((student, student_logits), (teacher, teacher_logits)):
                if head.requires_grad:
                    head.accumulate(start, stop, grad_logits)
    assert total is not None  # the loop runs at least once
    return total / plan.divisor


def _divergence_slice(
    plan: _Plan,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float | torch.Tensor,
    student_grad: bool,
    teacher_grad: bool,
) -> torch.Tensor:
    """The divergence summed over a slice of rows; overwrites the logits of each side that needs gradients with the
    gradient of the (reduced) loss w.r.t. them."""
    student_leaf = student_logits.detach().requires_grad_(student_grad)
    teacher_leaf = teacher_logits.detach().requires_grad_(teacher_grad)
    pairs = ((student_leaf, student_logits), (teacher_leaf, teacher_logits))
    targets = [(leaf, logits) for leaf, logits in pairs if leaf.requires_grad]
    grads: tuple[torch.Tensor | None, ...] = (None,) * len(targets)
    with torch.set_grad_enabled(bool(targets)):
        loss = plan.loss_fn(
            student_leaf, teacher_leaf, mask=None, temperature=temperature, reduction="sum", **plan.loss_kwargs
        )
        if targets and loss.requires_grad:  # no graph: the loss does not depend on these logits (e.g. skew=1)
            # The reduction's 1/divisor enters here, where the plain path's backward would apply it.
            grad_seed = torch.ones_like(loss) / plan.divisor
            leaves = [leaf for leaf, _ in targets]
            grads = torch.autograd.grad(loss, leaves, grad_outputs=grad_seed, allow_unused=True)
    with torch.no_grad():  # the slice's graph is gone: its logits' memory can hold their gradient
        for (_, logits), grad in zip(targets, grads, strict=True):
            if grad is None:
                logits.zero_()
            else:
                logits.copy_(grad)
    return loss.detach()


def _slice_rows(chunk_rows: int, student: _Head, teacher: _Head) -> int:
    """Rows per divergence call: the whole chunk, except on CPU, where each float32 ``(rows, V)`` temporary of the
    divergence stays within ``_CPU_SLICE_BYTES``."""
    if student.weight.device.type != "cpu":
        return max(chunk_rows, 1)
    vocab = max(student.weight.shape[0], teacher.weight.shape[0])  # the padded size under vocab_policy="pad"
    itemsize = compute_dtype(student.weight, teacher.weight).itemsize
    return max(1, min(chunk_rows, _CPU_SLICE_BYTES // (vocab * itemsize)))


class _ChunkedDivergence(torch.autograd.Function):
    """Forward computes the loss *and* the gradients chunk by chunk; backward scales and returns them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_hidden: torch.Tensor,
        student_head_weight: torch.Tensor,
        student_head_bias: torch.Tensor | None,
        teacher_hidden: torch.Tensor,
        teacher_head_weight: torch.Tensor,
        teacher_head_bias: torch.Tensor | None,
        counted_index: torch.Tensor | None,
        plan: _Plan,
    ) -> torch.Tensor:
        needs = ctx.needs_input_grad
        student = _Head(
            _counted_rows(student_hidden, counted_index), student_head_weight, student_head_bias, needs[0:3]
        )
        teacher = _Head(
            _counted_rows(teacher_hidden, counted_index), teacher_head_weight, teacher_head_bias, needs[3:6]
        )
        loss = _run_chunks(student, teacher, plan)
        ctx.save_for_backward(
            student.grad_rows,
            student.grad_weight,
            student.grad_bias,
            teacher.grad_rows,
            teacher.grad_weight,
            teacher.grad_bias,
            counted_index,
        )
        inputs = (student_hidden, student_head_weight, student_head_bias, teacher_hidden, teacher_head_weight)
        ctx.input_meta = [(t.shape, t.dtype) if t is not None else None for t in (*inputs, teacher_head_bias)]
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        *grads, counted_index = ctx.saved_tensors
        results = _scaled_gradients(grads, ctx.input_meta, grad_output)
        for position in (0, 3):  # student_hidden or teacher_hidden: put the counted rows back at their positions
            if results[position] is not None:
                results[position] = _scatter_rows(results[position], counted_index, ctx.input_meta[position][0])
        return (*results, None, None)


# ---------------------------------------------------------------- helpers


def _scaled_gradients(
    grads: Sequence[torch.Tensor | None], metas: Sequence[Any], grad_output: torch.Tensor
) -> list[torch.Tensor | None]:
    """The gradients a forward pass computed, times the upstream gradient, in each input's dtype."""
    scale = None if bool((grad_output == 1).all()) else grad_output  # exactly 1: skip a V × H multiply
    return [
        None if grad is None or meta is None else (grad if scale is None else grad * scale).to(meta[1])
        for grad, meta in zip(grads, metas, strict=True)
    ]


def _counted_rows(hidden: torch.Tensor, counted_index: torch.Tensor | None) -> torch.Tensor:
    """``(..., H) -> (n_counted, H)``: the counted positions' rows, in row-major order."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    return flat if counted_index is None else flat.index_select(0, counted_index)


def _scatter_rows(grad_rows: torch.Tensor, counted_index: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """``(n_counted, H) -> shape (..., H)`` with zeros at the uncounted positions."""
    if counted_index is None:
        return grad_rows.reshape(shape)
    full = grad_rows.new_zeros(shape.numel() // shape[-1], shape[-1])  # (N, H)
    full.index_copy_(0, counted_index, grad_rows)
    return full.reshape(shape)


def _resolve_divergence(divergence: str | DivergenceFn) -> DivergenceFn:
    if callable(divergence):
        return divergence
    if not isinstance(divergence, str):
        raise InvalidArgumentError(
            f"divergence must be a registered name or a callable, got {type(divergence).__name__}"
        )
    entry = LOSSES.entry(divergence)  # unknown names raise UnknownNameError listing the known ones
    if entry.kind != "divergence":
        raise InvalidArgumentError(
            f"divergence={divergence!r} is a {entry.kind or 'non-divergence'} loss, not a divergence between "
            f"student and teacher logits; choose one of {', '.join(LOSSES.names(kind='divergence'))}"
        )
    return entry.obj


def _check_options(chunk_size: int, reduction: str, vocab_policy: str) -> None:
    if reduction == "none":
        raise InvalidArgumentError(
            "reduction='none' is not supported by chunked_divergence, which never holds all positions' logits; "
            "use 'mean', 'sum' or 'batchmean', or call the divergence on materialized logits for per-position values"
        )
    check_reduction(reduction, _REDUCTIONS)
    if vocab_policy not in VOCAB_POLICIES:
        raise InvalidArgumentError(
            f"vocab_policy={vocab_policy!r} is not one of {', '.join(map(repr, VOCAB_POLICIES))}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InvalidArgumentError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_head(side: str, hidden: object, weight: object, bias: object) -> None:
    """Validate one side's hidden states ``(..., H)``, head weight ``(V, H)`` and optional bias ``(V,)``."""
    for name, tensor in ((f"{side}_hidden", hidden), (f"{side}_head_weight", weight), (f"{side}_head_bias", bias)):
        if tensor is None and name.endswith("bias"):
            continue
        if not isinstance(tensor, torch.Tensor):
            raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise InvalidArgumentError(f"{name} must be floating point, got dtype {tensor.dtype}")
    assert isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor)
    if hidden.dim() < 1:
        raise ShapeMismatchError(f"{side}_hidden must have a hidden dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ShapeMismatchError(
            f"{side}_head_weight must be 2-D (vocab, hidden) like nn.Linear.weight, got shape {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ShapeMismatchError(
            f"{side}_hidden has size {hidden.shape[-1]} in its last dimension but {side}_head_weight is "
            f"{tuple(weight.shape)}; the weight must be (vocab, {hidden.shape[-1]}) in nn.Linear layout"
        )
    if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (weight.shape[0],):
        raise ShapeMismatchError(
            f"{side}_head_bias has shape {tuple(bias.shape)} but {side}_head_weight is {tuple(weight.shape)}; "
            f"the bias must be ({weight.shape[0]},)"
        )
    for name, tensor in ((f"{side}_head_weight", weight), (f"{side}_head_bias", bias)):
        if isinstance(tensor, torch.Tensor) and tensor.dtype != hidden.dtype:
            raise InvalidArgumentError(
                f"{name} has dtype {tensor.dtype} but {side}_hidden has {hidden.dtype}; cast one of them so the "
                "LM-head product runs in one dtype"
            )


# ---------------------------------------------------------------- hard labels


def chunked_token_cross_entropy(
    rows: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``Σ −log softmax(rows @ weight.T + bias)[target]`` over ``rows`` ``(n, H)`` and ``targets`` ``(n,)`` (all
    counted), never holding more than one chunk's logits.

    Like :func:`chunked_divergence`, the forward pass computes the gradients as it goes (softmax − one-hot, turned
    into the rows', weight's and bias's gradients chunk by chunk) and the backward pass only scales them, so each
    chunk's logits are computed once, not again under activation checkpointing. Without gradients it is a plain
    chunked forward. The math is float32 (float64 for float64 inputs), as :func:`token_cross_entropy`'s.
    """
    if rows.dim() != 2 or targets.shape != rows.shape[:1]:
        raise ShapeMismatchError(f"rows {tuple(rows.shape)} and targets {tuple(targets.shape)} must be (n, H), (n,)")
    vocab = weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        bad = int(targets[(targets < 0) | (targets >= vocab)][0])
        raise InvalidArgumentError(
            f"label {bad} is outside the {vocab} classes of the LM head (valid: 0..{vocab - 1})"
        )
    if chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedCrossEntropy.apply(rows, weight, bias, targets, chunk_size)


def _cross_entropy_chunks(head: _Head, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The summed cross-entropy of all rows; fills the head's gradient accumulators on the way."""
    n_rows = head.rows.shape[0]
    chunk_rows = max(min(chunk_size, n_rows), 1)
    vocab = head.weight.shape[0]
    dtype = compute_dtype(head.weight)
    slice_rows = (
        chunk_rows if head.weight.device.type != "cpu" else max(1, _CPU_SLICE_BYTES // (vocab * dtype.itemsize))
    )
    buffer = head.logits_buffer(chunk_rows)  # (chunk, V): the logits, then their gradient
    total = torch.zeros((), dtype=dtype, device=head.weight.device)
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        with torch.no_grad():
            logits = head.logits(start, stop, buffer)  # (chunk, V)
            for first in range(0, stop - start, slice_rows):
                last = min(first + slice_rows, stop - start)
                part = logits[first:last]
                wide = part.to(dtype)  # (slice, V)
                picked = targets[start + first : start + last]
                log_norm = torch.logsumexp(wide, dim=-1)  # (slice,)
                chosen = wide.gather(-1, picked[:, None]).squeeze(-1)
                total += (log_norm - chosen).sum()
                if head.requires_grad:  # d/dlogits of −log p(target): softmax − one-hot
                    grad = torch.exp(wide - log_norm[:, None])
                    grad[torch.arange(last - first, device=grad.device), picked] -= 1.0
                    part.copy_(grad)
            if head.requires_grad:
                head.accumulate(start, stop, logits)
    return total


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the summed cross-entropy *and* its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        rows: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        head = _Head(rows, weight, bias, ctx.needs_input_grad[0:3])
        loss = _cross_entropy_chunks(head, targets, chunk_size)
        ctx.save_for_backward(head.grad_rows, head.grad_weight, head.grad_bias)
        ctx.input_meta = [(t.shape, t.dtype) if t is not None else None for t in (rows, weight, bias)]
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return (*_scaled_gradients(ctx.saved_tensors, ctx.input_meta, grad_output), None, None)
