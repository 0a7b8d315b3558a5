"""Causal-LM runs from YAML (``kdistill train`` with ``task: causal_lm``), on tiny Llamas saved with a tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import make_tiny_chat_tokenizer, make_tiny_llama
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.errors import InvalidArgumentError
from kdistill.models.students import from_teacher
from kdistill.runs.causal_lm import check_causal_lm_config
from kdistill.runs.run import run

WORDS = ["hello", "hi", "good", "fine", "thanks", "yes", "no", "i", "like", "love", "you", "what", "how", "name"]


def write_model(directory: Path, **kwargs) -> Path:
    """A tiny Llama whose LM head is scaled up: peaked next-token distributions, so a cut copy is far from it."""
    make_tiny_chat_tokenizer().save_pretrained(directory)
    model = make_tiny_llama(**kwargs)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory)
    return directory


def write_records(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def lm_run_config(tmp_path: Path) -> dict:
    """A small distillation run of a 2-layer cut of a tiny Llama, on 24 chat records (the tests change it)."""
    teacher = write_model(tmp_path / "teacher")
    return {
        "task": "causal_lm",
        "data": {
            "files": {
                "train": str(write_records(tmp_path / "train.jsonl", 24)),
                "validation": str(write_records(tmp_path / "validation.jsonl", 8, seed=1)),
            },
            "max_length": 32,
        },
        "teacher": {"path": str(teacher)},
        "student": {"kind": "from_teacher", "layers": [0, 3]},
        "distill": {"kd_loss": "reverse_kl", "kd_weight": 1.0, "hard_weight": 0.0, "temperature": 1.0},
        "training": {"max_steps": 8, "batch_size": 4, "learning_rate": 3e-3, "log_with": [], "progress": False},
        "output_dir": str(tmp_path / "run"),
    }


@pytest.fixture
def lm_run(tmp_path: Path) -> dict:
    return lm_run_config(tmp_path)


def test_a_causal_lm_run_writes_a_loadable_student_and_its_scores(lm_run: dict) -> None:
    result = run(load_config(data=lm_run))
    out = Path(lm_run["output_dir"])
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    scores = json.loads((out / "eval.json").read_text())
    assert set(scores) >= {"validation/perplexity", "validation/teacher_agreement", "validation/kl_to_teacher"}
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2
    assert scores == pytest.approx(result.metrics)
    ids = torch.tensor([[4, 6, 20, 2]])
    assert student(input_ids=ids).logits.shape == (1, 4, 128)


def test_distillation_beats_the_untrained_cut_on_kl(lm_run: dict, tmp_path: Path) -> None:
    trained = run(load_config(data=lm_run)).metrics["validation/kl_to_teacher"]
    untrained = dict(lm_run, output_dir=str(tmp_path / "untrained"))
    untrained["training"] = dict(lm_run["training"], learning_rate=1e-12)
    before = run(load_config(data=untrained)).metrics["validation/kl_to_teacher"]
    assert trained < before


def test_lora_student_and_chunked_loss_through_the_cli(lm_run: dict, tmp_path: Path) -> None:
    import yaml

    lm_run["student"]["lora"] = {"r": 4, "alpha": 8}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(lm_run))
    assert main(["train", str(path), "distill.chunked_loss=true", "distill.chunk_size=16"]) == 0
    out = Path(lm_run["output_dir"])
    scores = json.loads((out / "eval.json").read_text())
    assert scores["validation/perplexity"] > 1.0
    assert (out / "student_adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "student")  # a plain model: the adapter merged in
    assert not any("lora" in name for name in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(lm_run["teacher"]["path"])
    with_adapter = PeftModel.from_pretrained(from_teacher(base, [0, 3]), out / "student_adapter").eval()
    ids = torch.tensor([[4, 6, 20, 21, 2]])
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "student",
    [
        {"kind": "shrink", "num_layers": 1, "hidden_size": 16, "num_heads": 4},
        {"kind": "pretrained", "path": "SMALL"},  # any small causal LM sharing the tokenizer
    ],
)
def test_other_students_and_on_policy_steps(lm_run: dict, tmp_path: Path, student: dict) -> None:
    if student.get("path") == "SMALL":
        student = dict(student, path=str(write_model(tmp_path / "small", num_layers=1, hidden=16, seed=4)))
    lm_run["student"] = student
    lm_run["distill"].update(on_policy_fraction=1.0, on_policy_max_new_tokens=4)  # every step samples
    result = run(load_config(data=lm_run))
    saved = AutoModelForCausalLM.from_pretrained(result.student_dir)
    assert saved.config.num_hidden_layers == 1 and saved.config.hidden_size == 16
    assert result.metrics["validation/kl_to_teacher"] > 0


def test_black_box_pipeline_generate_then_sft(lm_run: dict, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"hello how are you {i}"}) + "\n" for i in range(6)))
    data = tmp_path / "generated.jsonl"
    teacher = lm_run["teacher"]["path"]
    assert main(["generate", "--teacher", teacher, "--prompts", str(prompts), "--out", str(data),
                 "--max-new-tokens", "5", "--batch-size", "4"]) == 0  # fmt: skip
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(lines) == 6 and all(line["messages"][-1]["role"] == "assistant" for line in lines)
    lm_run["mode"] = "baseline"
    lm_run["data"]["files"]["train"] = str(data)
    result = run(load_config(data=lm_run))
    assert json.loads((result.output_dir / "run.json").read_text())["status"] == "complete"


def test_baseline_is_sft_without_a_teacher(lm_run: dict) -> None:
    lm_run["mode"] = "baseline"
    result = run(load_config(data=lm_run))
    assert "validation/perplexity" in result.metrics  # agreement is still measured against the configured teacher


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"distill": {"layer_map": "uniform"}}, "distill.layer_map"),
        ({"distill": {"kd_weight": 0.0}}, "mode 'baseline'"),
        ({"mode": "train_teacher"}, "train_teacher"),
        (
            {"distill": {"temperature": {"name": "flsw", "beta": 1.0, "gamma": 1.0}}},
            r"distill.temperature.*backend: engine",
        ),
        (
            {"distill": {"matches": [{"teacher": "layer 2", "student": "layer 1"}]}},
            r"distill.matches.*backend: engine",
        ),
        ({"extra_teachers": [{"path": "x"}]}, r"extra_teachers.*backend: engine"),
        ({"training": {"metric_for_best": "perplexity"}}, r"training.metric_for_best.*backend: engine"),
        ({"distill": {"stages": [{"steps": 2, "weights": {"hidden": 0.0}}]}}, "'hidden', which is not a term"),
        ({"training": {"backend": "engine"}, "distill": {"chunked_loss": True}}, r"chunked_loss.*backend: trainer"),
        ({"training": {"backend": "engine"}, "student": {"lora": {"r": 2}}}, r"student.lora.*backend: trainer"),
        ({"training": {"backend": "engine"}, "distill": {"on_policy_fraction": 0.5}}, r"on_policy.*backend: trainer"),
        (
            {"training": {"backend": "engine"}, "distill": {"cross_tokenizer": "uld"}},
            r"cross_tokenizer.*backend: trainer",
        ),
    ],
)
def test_what_causal_lm_runs_do_not_do_is_refused_by_name(lm_run: dict, change: dict, message: str) -> None:
    data = json.loads(json.dumps(lm_run))
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    with pytest.raises(InvalidArgumentError, match=message):
        check_causal_lm_config(load_config(data=data))
