"""Distillation across tokenizers in the engine: a WordPiece teacher into a student with another tokenizer.

The KD terms of ``CrossTokenizerDistiller`` equal float64 references written here (sorted probabilities for ULD,
hand-listed character groups for ``align``); ``kdistill train`` runs on classification and on NER with both methods
reduce the saved student's loss to the teacher; the errors name the field or the tokenizers involved.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))
from cli_support import sentiment_rows, write_csv, write_tokenizer, write_yaml
from task_support import minilm_tokenizer, tiny_bert

from conftest import make_tiny_bert
from kdistill.config import load_config
from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.distillers import CrossTokenizerDistiller, Distiller, Match, Objective
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.models.students import build_student
from kdistill.tasks import TokenClassificationTask

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
ROWS = [
    {"tokens": ["Anna", "Kowalczyk", "lives", "in", "Washingtonville", "."],
     "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]},
    {"tokens": ["Johnson", "visited", "Ouagadougou"], "tags": ["B-PER", "O", "B-LOC"]},
    {"tokens": ["Nothing", "here"], "tags": ["O", "O"]},
]  # fmt: skip
QUIET = "  log_with: []\n  progress: false\n"


def _confident(model: torch.nn.Module, scale: float = 20.0) -> torch.nn.Module:
    with torch.no_grad():
        model.classifier.weight.mul_(scale)  # a random head predicts near-uniformly: give the teacher opinions
    return model


def _logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k in keys}).logits


def _probs(row: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(row.double() / temperature, dim=-1)


def _forward_kl(student_row: torch.Tensor, teacher_row: torch.Tensor, temperature: float) -> float:
    p_t, p_s = _probs(teacher_row, temperature), _probs(student_row, temperature)
    return float((p_t * (p_t.log() - p_s.log())).sum())


def _word_student_setup(method: str, temperature: float = 2.0):
    words = WordTokenizer.build([row["tokens"] for row in ROWS])
    task = TokenClassificationTask(label_names=TAGS, cross_tokenizer=method)
    examples = task.preprocess(ROWS, tokenizer=words, teacher_tokenizer=minilm_tokenizer(), max_length=32)
    batch = task.collate(examples)
    teacher = _confident(tiny_bert("token", num_labels=len(TAGS)))
    student = build_student("bilstm", teacher, vocab=words, embedding_dim=8, hidden_size=8, task="token", seed=3)
    objective = Objective(kd_weight=1.0, hard_weight=1.0, temperature=temperature)
    distiller = CrossTokenizerDistiller(student, teacher, objective, method=method, view=task.view)
    return distiller, batch, student, teacher


def test_uld_term_equals_sorted_probability_reference() -> None:
    distiller, batch, student, teacher = _word_student_setup("uld", temperature=2.0)
    module = distiller.setup(batch)
    student.eval()  # no dropout: the reference reruns the student
    terms = distiller.compute_terms(module, batch, {"kd": 1.0, "hard": 1.0}, 0, 1)
    s_logits, t_logits = _logits(student, batch["student"]), _logits(teacher, batch["teacher"])
    reference, pairs = 0.0, 0
    for row in range(s_logits.shape[0]):
        s_spans, t_spans = batch["student"]["offset_mapping"][row], batch["teacher"]["offset_mapping"][row]
        s_pos = [i for i, (a, b) in enumerate(s_spans.tolist()) if b > a]  # words
        t_pos = [i for i, (a, b) in enumerate(t_spans.tolist()) if b > a]  # pieces, no [CLS]/[SEP]/padding
        for i, j in zip(s_pos, t_pos, strict=False):  # the i-th counted token of each side, up to the shorter
            p_s = sorted(_probs(s_logits[row, i], 2.0).tolist(), reverse=True)
            p_t = sorted(_probs(t_logits[row, j], 2.0).tolist(), reverse=True)
            reference += sum(abs(a - b) for a, b in zip(p_s, p_t, strict=True))
            pairs += 1
    assert pairs == 6 + 3 + 2  # every row has at least as many pieces as words
    assert distiller.count_units(batch)["aligned_pairs"] == pairs
    assert float(terms["kd"].total.detach()) == pytest.approx(4.0 * reference, rel=1e-5)  # × T²
    assert terms["kd"].unit == "aligned_pairs" and reference > 0.1
    assert terms["hard"].unit == "label_positions" and float(terms["hard"].total.detach()) > 0


def test_align_term_equals_first_token_reference_on_listed_groups() -> None:
    distiller, batch, student, teacher = _word_student_setup("align", temperature=2.0)
    module = distiller.setup(batch)
    student.eval()  # no dropout: the reference reruns the student
    terms = distiller.compute_terms(module, batch, {"kd": 1.0, "hard": 0.0}, 0, 1)
    s_logits, t_logits = _logits(student, batch["student"]), _logits(teacher, batch["teacher"])
    # each word with its teacher pieces (MiniLM: [CLS] anna ko ##wal ##cz ##yk lives in washington ##ville . [SEP],
    # [CLS] johnson visited o ##ua ##ga ##dou ##go ##u [SEP], [CLS] nothing here [SEP]); compared at first tokens
    groups = [
        [([0], [1]), ([1], [2, 3, 4, 5]), ([2], [6]), ([3], [7]), ([4], [8, 9]), ([5], [10])],
        [([0], [1]), ([1], [2]), ([2], [3, 4, 5, 6, 7, 8])],
        [([0], [1]), ([1], [2])],
    ]
    reference = sum(
        _forward_kl(s_logits[row, s[0]], t_logits[row, t[0]], 2.0) for row, rows in enumerate(groups) for s, t in rows
    )
    assert distiller.count_units(batch)["aligned_pairs"] == 11
    assert float(terms["kd"].total.detach()) == pytest.approx(4.0 * reference, rel=1e-5)
    # with a word-level student, "align" reads the teacher where the first-piece alignment does: the same term
    first_piece = Distiller(
        student, TokenClassificationTask(label_names=TAGS).adapt_teacher(teacher, tokenizer=1, teacher_tokenizer=2),
        Objective(kd_weight=1.0, temperature=2.0), view=TokenClassificationTask().view,
    )  # fmt: skip
    plain = {k: v for k, v in batch.items()}
    plain["teacher"] = {k: v for k, v in batch["teacher"].items() if k != "offset_mapping"}
    first_module = first_piece.setup(plain)
    expected = first_piece.compute_terms(first_module, plain, {"kd": 1.0}, 0, 1)["kd"].total
    torch.testing.assert_close(terms["kd"].total, expected)

    # merged spans on both sides: student "ab|cde|f" against teacher "a|bcde|f" (hand-made offsets)
    student_offsets = torch.tensor([[[0, 2], [2, 5], [5, 6], [0, 0]]])
    teacher_offsets = torch.tensor([[[0, 0], [0, 1], [1, 5], [5, 6], [0, 0]]])
    generator = torch.Generator().manual_seed(0)
    s_rows, t_rows = torch.randn(1, 4, 5, generator=generator), torch.randn(1, 5, 5, generator=generator) * 3
    synthetic = {
        "student": {"input_ids": torch.ones(1, 4, dtype=torch.long), "offset_mapping": student_offsets},
        "teacher": {"input_ids": torch.ones(1, 5, dtype=torch.long), "offset_mapping": teacher_offsets},
    }
    term = distiller.cross_kd_term(s_rows, t_rows, synthetic)
    by_hand = _forward_kl(s_rows[0, 0], t_rows[0, 1], 2.0) + _forward_kl(s_rows[0, 2], t_rows[0, 3], 2.0)
    assert float(term.total) == pytest.approx(4.0 * by_hand, rel=1e-6)  # groups ([0, 1], [1, 2]) and ([2], [3])


def test_distiller_refuses_what_it_cannot_pair() -> None:
    teacher, student = tiny_bert("token", num_labels=len(TAGS)), tiny_bert("token", num_labels=len(TAGS), seed=1)
    with pytest.raises(InvalidArgumentError, match="must be 'uld' or 'align', got 'sorted'"):
        CrossTokenizerDistiller(student, teacher, Objective(), method="sorted")
    with pytest.raises(InvalidArgumentError, match=r"per-position temperatures .*distill.cross_tokenizer"):
        CrossTokenizerDistiller(
            student, teacher, Objective(temperature={"name": "flsw", "beta": 1.0, "gamma": 1.0}), method="uld"
        )
    with pytest.raises(InvalidArgumentError, match=r"intermediate matches \('hidden:layer 1->layer 1'"):
        objective = Objective(matches=[Match(student="layer 1", teacher="layer 1")])
        CrossTokenizerDistiller(student, teacher, objective, method="align")
    with pytest.raises(InvalidArgumentError, match="one teacher's tokens"):
        CrossTokenizerDistiller(student, [teacher, teacher], Objective(), method="uld")
    distiller = CrossTokenizerDistiller(student, teacher, Objective(), method="uld")
    plain = TokenClassificationTask(label_names=TAGS).preprocess(ROWS, tokenizer=minilm_tokenizer())
    with pytest.raises(KdistillError, match=r"batch\['student'\]\['offset_mapping'\]"):
        distiller.setup(TokenClassificationTask().collate(plain))


# ---------------------------------------------------------------- runs through `kdistill train`

PEOPLE, PLACES = ["john", "mary", "kowalczyk", "ngozi"], ["paris", "london", "ouagadougou", "reykjavik"]


def _write_ner(path: Path, n: int, seed: int) -> Path:
    """Sentences whose unknown names the teacher's letter-level WordPiece splits into several pieces."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [(rng.choice(PEOPLE), "B-PER"), ("lives", "O"), ("in", "O"), (rng.choice(PLACES), "B-LOC")]
        if rng.random() < 0.5:
            words = [("so", "O"), *words]
        lines += [f"{word} {tag}" for word, tag in words] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def _save_teacher(directory: Path, task: str, num_labels: int) -> Path:
    tokenizer = write_tokenizer(directory)  # WordPiece: the cue words whole, other words letter by letter
    rows = len(tokenizer)
    model = _confident(make_tiny_bert(vocab=rows, num_labels=num_labels, task=task, seed=0), 10.0)
    model.save_pretrained(directory)
    return directory


def _kd_per_unit(distiller: Distiller, batch: dict) -> float:
    module = distiller.setup(batch)
    counts = distiller.count_units(batch)
    module.eval()
    with torch.no_grad():
        term = distiller.compute_terms(module, batch, {"kd": 1.0}, 0, 1)["kd"]
    return float(term.total) / counts[term.unit]


def _before_and_after(config_path: Path, make_distiller) -> tuple[float, float, dict]:
    """The KD loss per unit on the first 16 training examples: the run's fresh student, then the saved one."""
    from kdistill.models.loading import load_any_model
    from kdistill.runs.parts import build_parts

    config = load_config(config_path)
    parts = build_parts(config)  # the student the run started from (same seed)
    batch = parts.collate(parts.train_examples[:16])
    teacher = parts.task.adapt_teacher(
        parts.teacher, tokenizer=parts.student_tokenizer, teacher_tokenizer=parts.teacher_tokenizer
    )
    before = _kd_per_unit(make_distiller(parts.student, teacher, parts), batch)
    saved = load_any_model(str(Path(config.output_dir) / "student"))
    after = _kd_per_unit(make_distiller(saved, teacher, parts), batch)
    lines = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in lines if "train/kd" in line]  # the training records, not the evaluations
    return before, after, {"first": lines[0], "last": lines[-1]}


@pytest.mark.parametrize("method", ["uld", "align"])
def test_ner_run_with_a_word_level_student_reduces_its_loss_to_the_teacher(tmp_path, method) -> None:
    from kdistill.cli import main

    teacher = _save_teacher(tmp_path / "teacher", "token", len(TAGS))
    train, valid = _write_ner(tmp_path / "train.conll", 48, 1), _write_ner(tmp_path / "valid.conll", 8, 2)
    cfg = write_yaml(
        tmp_path / "run.yaml",
        f"""task: token_classification
data:
  files: {{train: {train}, validation: {valid}}}
  label_names: [O, B-PER, I-PER, B-LOC, I-LOC]
teacher: {{path: {teacher}}}
student: {{kind: bilstm, vocab: own, hidden_size: 16, embed_dim: 16}}
distill: {{kd_weight: 1.0, hard_weight: 0.0, temperature: 2.0, cross_tokenizer: {method}}}
training:
  batch_size: 8
  learning_rate: 1.0e-2
  lr_scheduler: constant
  max_steps: 24
  log_every: 4
{QUIET}output_dir: {tmp_path / "run"}
""",
    )
    assert main(["train", str(cfg)]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"
    assert "validation/f1" in json.loads((tmp_path / "run" / "eval.json").read_text())

    def distiller(student, teacher, parts):
        objective = Objective(kd_weight=1.0, temperature=2.0)
        return CrossTokenizerDistiller(student, teacher, objective, method=method, view=parts.task.view)

    before, after, logged = _before_and_after(cfg, distiller)
    assert after < 0.5 * before, (before, after)
    assert logged["last"]["train/kd"] < logged["first"]["train/kd"]
    assert math.isfinite(logged["last"]["train/kd"])


def test_classification_run_with_a_word_level_student_reduces_its_loss_to_the_teacher(tmp_path) -> None:
    from kdistill.cli import main
    from kdistill.runs.run import run

    teacher = _save_teacher(tmp_path / "teacher", "sequence", 2)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=1))
    valid = write_csv(tmp_path / "valid.csv", sentiment_rows(16, seed=2))
    body = f"""task: sequence_classification
data:
  files: {{train: {train}, validation: {valid}}}
  label_names: [negative, positive]
teacher: {{path: {teacher}}}
student: {{kind: bilstm, vocab: own, hidden_size: 16, embed_dim: 16}}
training:
  batch_size: 16
  learning_rate: 1.0e-2
  lr_scheduler: constant
  max_steps: 16
  log_every: 4
{QUIET}"""
    cfg = write_yaml(tmp_path / "run.yaml", body + f"distill: {{kd_weight: 1.0, hard_weight: 0.0, temperature: 2.0}}\n"
                     f"output_dir: {tmp_path / 'run'}\n")  # fmt: skip
    assert main(["train", str(cfg)]) == 0

    def distiller(student, teacher, parts):
        return Distiller(student, teacher, Objective(kd_weight=1.0, temperature=2.0), view=parts.task.view)

    before, after, logged = _before_and_after(cfg, distiller)
    assert after < 0.5 * before, (before, after)
    assert logged["last"]["train/kd"] < logged["first"]["train/kd"]

    refused = write_yaml(tmp_path / "refused.yaml", body + f"distill: {{cross_tokenizer: uld}}\n"
                         f"output_dir: {tmp_path / 'refused'}\n")  # fmt: skip
    with pytest.raises(InvalidArgumentError, match=r"distill\.cross_tokenizer applies to token_classification, not "
                       "sequence_classification"):  # fmt: skip
        run(load_config(refused))
    assert not (tmp_path / "refused").exists()
