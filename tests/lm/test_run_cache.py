"""Causal-LM runs from a teacher cache, through the CLI: ``kdistill cache RUN.yaml`` then ``kdistill train`` with
``distill.teacher_cache``. A full (k = V, float32) cache trains the student the live teacher trains; a top-k cache
trains (its own loss falls, measured on the weights the run wrote); a cache written for other settings is refused by
name before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_run import write_model, write_records
from transformers import AutoModelForCausalLM

from kdistill.cache import CacheReader
from kdistill.cache.batches import CachedTeacherCollate, with_cache_index
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.distillers.lm_cached import cached_lm_loss_sums
from kdistill.errors import InvalidArgumentError
from kdistill.runs.causal_lm import check_causal_lm_config
from kdistill.runs.causal_lm_parts import causal_lm_parts


@pytest.fixture
def run_yaml(tmp_path: Path) -> Path:
    config = {
        "task": "causal_lm",
        "data": {"files": {"train": str(write_records(tmp_path / "train.jsonl", 12))}, "max_length": 24},
        "teacher": {"path": str(write_model(tmp_path / "teacher"))},
        "student": {"kind": "from_teacher", "layers": [0, 3]},
        "distill": {"kd_loss": "forward_kl", "kd_weight": 1.0, "hard_weight": 0.5, "temperature": 2.0},
        # plain SGD (the Trainer backend takes training.sgd_momentum, 0.9 by default, since both backends do)
        "training": {"max_steps": 6, "batch_size": 4, "optimizer": "sgd", "sgd_momentum": 0.0, "learning_rate": 0.05,
                     "lr_scheduler": "constant", "max_grad_norm": None, "log_with": [], "progress": False},
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cache(run_yaml: Path, out: Path, k: str) -> Path:
    assert main(["cache", str(run_yaml), "--out", str(out), "--k", k, "--dtype", "float32", "--shard-size", "5"]) == 0
    return out


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


@pytest.mark.parametrize("chunked", [False, True])
def test_a_full_cache_trains_the_student_the_live_teacher_trains(
    run_yaml: Path, tmp_path: Path, chunked: bool
) -> None:
    cache = _cache(run_yaml, tmp_path / "cache", "all")
    common = [f"distill.chunked_loss={str(chunked).lower()}", "distill.chunk_size=7"]
    assert main(["train", str(run_yaml), f"output_dir={tmp_path / 'live'}", *common]) == 0
    assert main(["train", str(run_yaml), f"output_dir={tmp_path / 'cached'}", f"distill.teacher_cache={cache}",
                 *common]) == 0  # fmt: skip
    live, cached = _weights(tmp_path / "live"), _weights(tmp_path / "cached")
    start = causal_lm_parts(load_config(run_yaml)).student.state_dict()
    assert max(float((live[key] - start[key]).abs().max()) for key in live) > 1e-3  # the runs trained
    assert live.keys() == cached.keys()
    for key in live:
        torch.testing.assert_close(cached[key], live[key], rtol=1e-4, atol=1e-6, msg=key)
    out = tmp_path / "cached"
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    scores = json.loads((out / "eval.json").read_text())
    assert "teacher_agreement" in scores["not_measured"] and "kl_to_teacher" in scores["not_measured"]


def _cached_kd(model: torch.nn.Module, run_yaml: Path, cache: Path) -> float:
    """The run's own objective's KD term, mean per counted token, over every training example (float64 sums)."""
    parts = causal_lm_parts(load_config(run_yaml))
    collate = CachedTeacherCollate(parts.collate, CacheReader(cache), per_token=True)
    examples = with_cache_index(parts.train_examples)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 4):
            batch = collate(examples[start : start + 4])
            sums = cached_lm_loss_sums(model, batch, batch["teacher_topk"], temperature=2.0)
            total, count = total + float(sums.kd_sum), count + sums.count
    return total / count


def test_a_top_k_cache_trains(run_yaml: Path, tmp_path: Path) -> None:
    cache = _cache(run_yaml, tmp_path / "cache", "4")
    out = tmp_path / "top4"
    assert main(["train", str(run_yaml), f"output_dir={out}", f"distill.teacher_cache={cache}",
                 "training.max_steps=12"]) == 0  # fmt: skip
    before = _cached_kd(causal_lm_parts(load_config(run_yaml)).student.eval(), run_yaml, cache)
    after = _cached_kd(AutoModelForCausalLM.from_pretrained(out / "student").eval(), run_yaml, cache)
    assert after < 0.9 * before, (before, after)


def test_a_cache_for_other_settings_is_refused_before_anything_is_written(
    run_yaml: Path, tmp_path: Path, capsys
) -> None:
    cache = _cache(run_yaml, tmp_path / "cache", "3")
    other_data = write_records(tmp_path / "other.jsonl", 12, seed=5)
    out = tmp_path / "refused"
    base = ["train", str(run_yaml), f"output_dir={out}", f"distill.teacher_cache={cache}"]
    for override, message in [
        ("distill.temperature=1.0", "cache manifest field 'temperature' is 2.0 but the run has 1.0"),
        (f"data.files.train={other_data}", "cache manifest field 'dataset_fingerprint'"),
        ("data.max_length=12", "cache manifest field 'dataset_fingerprint'"),
        ("distill.on_policy_fraction=0.5", "distill.on_policy_fraction=0.5 cannot be used with distill.teacher_cache"),
        ("training.eval_every=2", "training.eval_every cannot be used with distill.teacher_cache"),
    ]:
        assert main([*base, override]) == 2, override
        assert message in capsys.readouterr().err, override
        assert not out.exists(), override
    (cache / "shard-00001.safetensors").unlink()
    assert main(base) == 2
    assert "missing shards" in capsys.readouterr().err
    assert not out.exists()


def test_on_policy_with_a_cache_is_refused_by_the_config_check(run_yaml: Path, tmp_path: Path) -> None:
    config = load_config(run_yaml, [f"distill.teacher_cache={tmp_path}", "distill.on_policy_fraction=1.0"])
    with pytest.raises(InvalidArgumentError, match=r"distill\.on_policy_fraction=1\.0 cannot be used with distill"):
        check_causal_lm_config(config)
