"""What every task provides, and the small helpers the tasks share.

A task turns rows of a dataset into tokenized examples for :class:`~kdistill.data.PadCollator`, names the view the
distiller reads logits and labels through, runs a model over batches, and scores its predictions. Tasks are plain
dataclasses that satisfy :class:`Task`; they share code through the functions here, not through a base class.

Every example carries ``example_id``, the index of its source row, so that predictions can be matched to the
rows they came from (several QA windows share one row). The distillers ignore this key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from kdistill.core.batch import model_inputs
from kdistill.core.views import student_inputs, teacher_inputs
from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.errors import InvalidArgumentError

ENCODE_CHUNK = 1000  # rows tokenized per tokenizer call
IGNORE_INDEX = -100  # label value that no loss or metric counts
_NOT_MODEL_INPUTS = ("labels", "start_positions", "end_positions")  # gold data the models must not see


@runtime_checkable
class Task(Protocol):
    """The shape every task module shares.

    Attributes:
        name: ``"sequence"``, ``"token"``, ``"qa"``, ...
        view: ``logits(outputs) -> list[Tensor]`` (one per head), ``kd_mask(batch)``, ``labels(batch)``,
            ``count_logit_positions(batch)``.
        collate: examples → batch.
        auto_model_class: the transformers Auto class of a model for this task.

    ``adapt_teacher`` returns the teacher as the distiller must run it for the examples ``preprocess`` made with
    the same tokenizers (the teacher itself, or a wrapper: see the token task's word-aligned examples).
    """

    name: str

    @property
    def view(self) -> Any: ...

    @property
    def collate(self) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]: ...

    @property
    def auto_model_class(self) -> type: ...

    def preprocess(
        self,
        dataset: Any,
        *,
        tokenizer: Any,
        teacher_tokenizer: Any = None,
        max_length: int | None = None,
        label_names: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]: ...

    def adapt_teacher(self, teacher: nn.Module, *, tokenizer: Any, teacher_tokenizer: Any = None) -> nn.Module: ...

    def predict(
        self, model: nn.Module, batches: Sequence[Mapping[str, Any]], *, inputs: str = "student"
    ) -> list[list[torch.Tensor]]: ...

    def compute_metrics(
        self,
        logits_per_batch: Sequence[Sequence[torch.Tensor]],
        batches: Sequence[Mapping[str, Any]],
        examples_meta: Any = None,
    ) -> dict[str, float]: ...


# ---------------------------------------------------------------- columns and labels


def column_values(dataset: Any, column: str) -> list[Any]:
    """The values of ``column`` for a ``datasets.Dataset`` or a list of row dicts."""
    if hasattr(dataset, "column_names") and not isinstance(dataset, (list, tuple)):
        if column not in dataset.column_names:
            raise InvalidArgumentError(
                f"column {column!r} is not in the dataset; its columns are: {', '.join(dataset.column_names)}"
            )
        return list(dataset[column])
    values = []
    for index, row in enumerate(dataset):
        if column not in row:
            raise InvalidArgumentError(f"row {index} has no column {column!r}; it has: {', '.join(row)}")
        values.append(row[column])
    return values


def resolve_label_names(
    dataset: Any, column: str, label_names: Sequence[str] | None = None, *, per_token: bool = False
) -> tuple[str, ...]:
    """The label set: ``label_names`` when given, else the ``ClassLabel`` feature's names, else read off the data.

    Read off the data, string labels give their sorted distinct values and integer labels the names
    ``"0" .. "max"`` (negative integers mark unlabelled rows).

    Args:
        dataset: a ``datasets.Dataset`` or a list of row dicts.
        column: the label column.
        label_names: names in id order, when the caller knows them.
        per_token: the column holds one label per word (a list per row).
    """
    if label_names is not None:
        names = tuple(str(name) for name in label_names)
        if not names or len(set(names)) != len(names):
            raise InvalidArgumentError(f"label_names must be distinct and non-empty, got {list(label_names)}")
        return names
    features = getattr(dataset, "features", None)
    feature = features.get(column) if isinstance(features, Mapping) else None
    if per_token:
        feature = getattr(feature, "feature", None)
    if feature is not None and type(feature).__name__ == "ClassLabel":
        return tuple(feature.names)
    values = column_values(dataset, column)
    flat = [v for row in values for v in row] if per_token else values
    flat = [v for v in flat if v is not None]
    if flat and all(isinstance(v, str) for v in flat):
        return tuple(sorted(set(flat)))
    if flat and all(_is_int(v) for v in flat):
        return tuple(str(i) for i in range(max(int(v) for v in flat) + 1))
    kinds = sorted({type(v).__name__ for v in flat})
    raise InvalidArgumentError(
        f"cannot infer label names from column {column!r} (value types: {', '.join(kinds) or 'none'}); "
        "pass label_names"
    )


def label_to_id(value: Any, index_of: Mapping[str, int], row: int, column: str) -> int:
    """One label as its id: a name from the label set, or an id inside it; None or a negative id → ``-100``.

    Raises:
        InvalidArgumentError: naming the label, the row index and the label set.
    """
    if value is None:
        return IGNORE_INDEX
    if _is_int(value):
        number = int(value)
        if number < 0:
            return IGNORE_INDEX
        if number < len(index_of):
            return number
    elif isinstance(value, str) and value in index_of:
        return index_of[value]
    raise InvalidArgumentError(
        f"label {value!r} in row {row} (column {column!r}) is not in the label set {list(index_of)} "
        f"(ids 0..{len(index_of) - 1})"
    )


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and value.is_integer()


# ---------------------------------------------------------------- tokenizers


def tokenizers_differ(tokenizer: Any, teacher_tokenizer: Any) -> bool:
    """True when the teacher needs its own tokenization (another class or another vocabulary)."""
    if teacher_tokenizer is None or teacher_tokenizer is tokenizer:
        return False
    if type(teacher_tokenizer) is not type(tokenizer):
        return True
    get_student, get_teacher = getattr(tokenizer, "get_vocab", None), getattr(teacher_tokenizer, "get_vocab", None)
    if callable(get_student) and callable(get_teacher):
        return get_student() != get_teacher()
    return True


def token_inputs(encoding: Mapping[str, Any], index: int) -> dict[str, list[int]]:
    """Row ``index`` of a batch encoding: ``input_ids`` and, when the tokenizer makes them, ``token_type_ids``."""
    inputs = {"input_ids": list(encoding["input_ids"][index])}
    if "token_type_ids" in encoding:
        inputs["token_type_ids"] = list(encoding["token_type_ids"][index])
    return inputs


def chunks(count: int, size: int = ENCODE_CHUNK) -> Iterator[range]:
    """``range(count)`` cut into consecutive ranges of at most ``size``."""
    for start in range(0, count, size):
        yield range(start, min(start + size, count))


def require_fast(tokenizer: Any, what: str) -> None:
    """Fail unless ``tokenizer`` maps tokens back to words / characters (fast HF tokenizers, WordTokenizer)."""
    if not isinstance(tokenizer, WordTokenizer) and not getattr(tokenizer, "is_fast", False):
        raise InvalidArgumentError(
            f"{what} needs a fast tokenizer (one with word_ids and offsets); got {type(tokenizer).__name__}"
        )


# ---------------------------------------------------------------- running a model


def output_field(outputs: Any, key: str) -> torch.Tensor:
    """``outputs[key]`` of a ``ModelOutput``, a dict or an object attribute."""
    if isinstance(outputs, Mapping) and key in outputs:
        return outputs[key]
    value = getattr(outputs, key, None)
    if isinstance(value, torch.Tensor):
        return value
    raise InvalidArgumentError(f"the model's outputs have no {key!r}; got {type(outputs).__name__}")


def predict_logits(
    model: nn.Module, batches: Sequence[Mapping[str, Any]], view: Any, *, inputs: str = "student"
) -> list[list[torch.Tensor]]:
    """The logits of each head for each batch, on the CPU: eval mode, no gradients; the model's mode is restored.

    Args:
        model: any model the view reads (its forward takes the batch's entries by name).
        batches: collated batches.
        view: the task's view (``view.logits(outputs)``).
        inputs: ``"student"`` or ``"teacher"``: which inputs of a batch with separate tokenizations to use.
    """
    return [[logits.cpu() for logits in heads] for _, heads in iter_logits(model, batches, view, inputs=inputs)]


def iter_logits(
    model: nn.Module, batches: Sequence[Mapping[str, Any]], view: Any, *, inputs: str = "student"
) -> Iterator[tuple[Mapping[str, Any], list[torch.Tensor]]]:
    """Yield ``(model inputs of the batch, float32 logits of each head)`` one batch at a time, on the model's device.

    Eval mode, no gradients; the model's mode is restored when the iteration ends. For outputs too large to keep
    for a whole split (a causal LM's ``(B, T, V)`` logits), reduce each batch as it comes.
    """
    if inputs not in ("student", "teacher"):
        raise InvalidArgumentError(f"inputs must be 'student' or 'teacher', got {inputs!r}")
    pick = student_inputs if inputs == "student" else teacher_inputs
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            source = pick(batch)
            kwargs = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in model_inputs(model, source).items()
                if k not in _NOT_MODEL_INPUTS
            }
            with torch.no_grad():
                outputs = model(**kwargs)
            yield source, [logits.detach().float() for logits in view.logits(outputs)]
    finally:
        model.train(was_training)


def make_batches(
    examples: Sequence[Mapping[str, Any]], collate: Callable[[Sequence[Mapping[str, Any]]], Any], batch_size: int
) -> list[Any]:
    """Consecutive batches of ``batch_size`` examples, in order."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    return [collate(list(examples[span.start : span.stop])) for span in chunks(len(examples), batch_size)]


class ShowingProgress(Sequence):
    """``batches`` as a sequence whose iteration shows a progress bar (``desc``) on a terminal; indexing and
    length are the list's own. Evaluation passes this to a task's ``predict`` so a long split shows it moves."""

    def __init__(self, batches: Sequence[Any], desc: str) -> None:
        self.batches, self.desc = batches, desc

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: Any) -> Any:
        return self.batches[index]

    def __iter__(self) -> Iterator[Any]:
        from tqdm.auto import tqdm

        # disable=None: a bar on a terminal, nothing in a log file or a test's captured output
        yield from tqdm(self.batches, desc=self.desc, leave=False, disable=None, dynamic_ncols=True)


def evaluate_task(
    task: Task,
    model: nn.Module,
    examples: Sequence[Mapping[str, Any]],
    examples_meta: Any = None,
    *,
    batch_size: int = 32,
    inputs: str = "student",
    progress: str | None = None,
) -> dict[str, float]:
    """Batch ``examples``, run ``model`` over them and score: a ready ``eval_fn`` body for the training loop.
    ``progress``: a label for a progress bar over the batches (shown on a terminal), or None for none."""
    batches = make_batches(examples, task.collate, batch_size)
    shown = ShowingProgress(batches, progress) if progress else batches
    return task.compute_metrics(task.predict(model, shown, inputs=inputs), batches, examples_meta)


def rows_of(batch: Mapping[str, Any]) -> list[int]:
    """The ``example_id`` of each row of a batch."""
    ids = batch.get("example_id")
    if ids is None:
        raise InvalidArgumentError("the batch has no 'example_id'; build examples with the task's preprocess")
    return [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
