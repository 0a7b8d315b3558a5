"""``kdistill experiment``: a grid of variants on tiny offline runs, its tables, resumability and failures."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "cli"))
from cli_support import save_tiny_bert, sentiment_rows, write_csv, write_yaml

from kdistill.cli import experiment as experiment_cli
from kdistill.config import ConfigError, dump_config
from kdistill.runs.experiment import (
    count_saved_parameters,
    load_grid,
    plan_grid,
    run_grid,
)
from kdistill.runs.experiment_table import write_comparison
from kdistill.runs.records import run_status

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    teacher = save_tiny_bert(root / "teacher", num_labels=2, layers=2, hidden=16)
    train = write_csv(root / "train.csv", sentiment_rows(32, seed=1))
    valid = write_csv(root / "valid.csv", sentiment_rows(16, seed=2))
    base = {
        "task": "sequence_classification",
        "data": {"files": {"train": str(train), "validation": str(valid)}, "label_names": ["negative", "positive"]},
        "teacher": {"path": str(teacher)},
        "student": {"kind": "from_teacher", "layers": [1]},
        "training": {
            "batch_size": 16,
            "eval_batch_size": 16,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "log_with": [],
            "progress": False,
        },
    }
    write_yaml(root / "run.yaml", yaml.safe_dump(base))
    return root, base


def _grid_file(directory: Path, variants: dict, *, base="run.yaml", out="grid", **extra) -> Path:
    grid = {"base": base, "output_dir": str(directory / out), "variants": variants, **extra}
    return write_yaml(directory / f"{out}.yaml", yaml.safe_dump(grid, sort_keys=False))


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kdistill")
    experiment_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.func is experiment_cli.run
    return args.func(args)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _model_parameters(directory: Path) -> int:
    from kdistill.models.loading import load_any_model

    model = load_any_model(str(directory))
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_a_grid_runs_its_variants_writes_tables_and_skips_them_on_a_rerun(world, capsys):
    root, _ = world
    variants = {
        "kl": {"distill.kd_loss": "forward_kl"},
        "rkl": {"distill.kd_loss": "reverse_kl", "distill.kd_weight": 0.9, "distill.hard_weight": 0.1},
        "labels": {"mode": "baseline", "student.layers": [0, 1]},
    }
    grid_file = _grid_file(root, variants, metrics=["accuracy"], title="Loss ablation")
    out = root / "grid"
    assert _cli(["experiment", str(grid_file)]) == 0
    printed = capsys.readouterr().out

    # each variant ran its own config in output_dir/<name>
    configs = {name: yaml.safe_load((out / name / "config.yaml").read_text()) for name in variants}
    assert [configs[n]["distill"]["kd_loss"] for n in variants] == ["forward_kl", "reverse_kl", "forward_kl"]
    assert configs["rkl"]["distill"]["kd_weight"] == 0.9 and configs["kl"]["distill"]["kd_weight"] == 0.5
    assert configs["labels"]["mode"] == "baseline" and configs["kl"]["mode"] == "distill"
    assert all(run_status(out / name) == "complete" for name in variants)

    rows = _csv_rows(out / "experiment.csv")
    assert [row["variant"] for row in rows] == list(variants)
    assert list(rows[0]) == ["variant", "overrides", "validation/accuracy", "seconds", "params", "status"]
    table_lines = (out / "experiment.md").read_text().splitlines()
    assert table_lines[0] == "# Loss ablation"
    for row in rows:
        run_dir = out / row["variant"]
        accuracy = json.loads((run_dir / "eval.json").read_text())["validation/accuracy"]
        seconds = json.loads((run_dir / "run.json").read_text())["seconds"]
        params = _model_parameters(run_dir / "student")
        assert float(row["validation/accuracy"]) == accuracy
        assert float(row["seconds"]) == seconds
        assert int(row["params"]) == params
        assert row["status"] == "complete"
        overrides = ", ".join(f"{k}={v}" for k, v in variants[row["variant"]].items())
        assert row["overrides"] == overrides
        line = f"| {row['variant']} | {overrides} | {accuracy:.4f} | {seconds:.4f} | {params} | complete |"
        assert line in table_lines and line in printed
    assert "![Loss ablation](experiment.png)" in table_lines
    assert (out / "experiment.png").read_bytes().startswith(PNG_SIGNATURE)

    # a rerun skips every variant: nothing in the run directories changes, the table says "skipped"
    stamps = {name: [(out / name / f).stat().st_mtime_ns for f in ("run.json", "eval.json")] for name in variants}
    assert _cli(["experiment", str(grid_file)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert {n: [(out / n / f).stat().st_mtime_ns for f in ("run.json", "eval.json")] for n in variants} == stamps
    again = _csv_rows(out / "experiment.csv")
    assert [r["status"] for r in again] == ["skipped"] * 3
    assert [r["validation/accuracy"] for r in again] == [r["validation/accuracy"] for r in rows]

    # a changed variant is not silently skipped (nor overwritten): the grid stops before running anything
    variants["rkl"]["distill.kd_weight"] = 0.8
    changed = _grid_file(root, variants, out="grid")
    with pytest.raises(ConfigError, match=r"variant 'rkl': .*distill\.kd_weight: 0\.9 there, 0\.8 now"):
        run_grid(load_grid(changed))
    assert {n: [(out / n / f).stat().st_mtime_ns for f in ("run.json", "eval.json")] for n in variants} == stamps


BAD_VARIANTS = {
    "unknown key": (
        {"distill.kd_los": "reverse_kl"},
        r"unknown key 'distill\.kd_los'; did you mean 'distill\.kd_loss'",
    ),
    "bad value": ({"training.batch_size": "many"}, r"training\.batch_size"),
    "unknown loss": ({"distill.kd_loss": "klx"}, r"unknown loss 'klx'"),
    "bad schedule": ({"distill.kd_weight": {"name": "nope"}}, r"nope"),
    "output_dir": ({"output_dir": "elsewhere"}, r"output_dir is set by the grid"),
    "missing data": ({"data.files.validation": "nope.csv"}, r"data\.files\.validation: the file nope\.csv"),
    "not a mapping": (["distill.kd_loss=reverse_kl"], r"must be a mapping of dotted keys"),
}


@pytest.mark.parametrize("case", list(BAD_VARIANTS))
def test_a_bad_later_variant_fails_before_any_variant_runs(world, tmp_path, case):
    root, _ = world
    spec, message = BAD_VARIANTS[case]
    grid_file = _grid_file(tmp_path, {"first": {}, "second": {"distill.temperature": 4.0}, "third": spec},
                           base=str(root / "run.yaml"))  # fmt: skip
    with pytest.raises(ConfigError, match=rf"^variant 'third': .*{message}"):
        _cli(["experiment", str(grid_file)])
    assert not (tmp_path / "grid").exists()


def test_grid_file_errors_are_one_line_and_name_the_key(world, tmp_path):
    root, base = world
    cases = {
        "unknown grid key": ({"bas": "run.yaml", "variants": {"a": {}}}, r"unknown key 'bas'; did you mean 'base'"),
        "no variants": ({"base": base, "variants": {}}, r"'variants' must be a mapping"),
        "bad name": ({"base": base, "variants": {"a/b": {}}}, r"variant name 'a/b'"),
        "missing base file": ({"base": "nope.yaml", "variants": {"a": {}}}, r"base .*nope\.yaml does not exist"),
    }
    for name, (data, message) in cases.items():
        file = write_yaml(tmp_path / "g.yaml", yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=message) as caught:
            load_grid(file)
        assert "\n" not in str(caught.value), name
    twice = write_yaml(tmp_path / "twice.yaml", f"base: {root / 'run.yaml'}\nvariants:\n  a: {{}}\n  a: {{}}\n")
    with pytest.raises(ConfigError, match=r"key 'a' appears twice \(line 4\)"):
        load_grid(twice)
    # command-line overrides go to every variant's base, through the same machinery
    grid = load_grid(_grid_file(tmp_path, {"a": {}, "b": {"training.max_steps": 3}}, base=str(root / "run.yaml")),
                     ["training.max_steps=5", "seed=7"])  # fmt: skip
    assert [(v.config.training.max_steps, v.config.seed) for v in grid.variants] == [(5, 7), (3, 7)]
    with pytest.raises(ConfigError, match=r"variant 'a': unknown key 'sed'"):
        load_grid(_grid_file(tmp_path, {"a": {}}, base=str(root / "run.yaml")), ["sed=7"])


def test_a_failing_variant_is_recorded_and_the_next_one_still_runs(world, tmp_path, capsys):
    _, base = world
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    grid_file = _grid_file(tmp_path, {"broken": {"teacher.path": str(empty)}, "fine": {}}, base=base)
    out = tmp_path / "elsewhere"
    assert _cli(["experiment", str(grid_file), "training.max_steps=1", "--output-dir", str(out)]) == 1
    assert "1 of 2 variants failed: broken" in capsys.readouterr().err
    assert run_status(out / "fine") == "complete" and not (tmp_path / "grid").exists()
    assert yaml.safe_load((out / "fine" / "config.yaml").read_text())["training"]["max_steps"] == 1
    rows = {row["variant"]: row for row in _csv_rows(out / "experiment.csv")}
    assert rows["broken"]["status"] == "failed" and str(empty) in rows["broken"]["error"]
    assert rows["broken"]["validation/accuracy"] == "" and rows["broken"]["params"] == ""
    assert rows["fine"]["status"] == "complete" and rows["fine"]["error"] == ""
    fine_eval = json.loads((out / "fine" / "eval.json").read_text())
    assert float(rows["fine"]["validation/accuracy"]) == fine_eval["validation/accuracy"]
    markdown = (out / "experiment.md").read_text()
    assert "| broken | teacher.path=" in markdown and "| — | — | — | — | failed |" in markdown
    assert f"- `broken`: {rows['broken']['error']}" in markdown
    assert "Every variant: training.max_steps=1." in markdown


def test_plan_skips_same_config_resumes_unfinished_and_refuses_foreign_directories(world, tmp_path):
    _, base = world
    grid = load_grid(data={"base": base, "output_dir": str(tmp_path / "g"),
                           "variants": {"done": {}, "cut": {}, "new": {}, "junk": {}}})  # fmt: skip
    done, cut, _new, junk = grid.variants
    for variant, status in ((done, "complete"), (cut, "failed")):
        variant.output_dir.mkdir(parents=True)
        (variant.output_dir / "run.json").write_text(json.dumps({"status": status}))
        (variant.output_dir / "config.yaml").write_text(
            dump_config(variant.config.model_copy(update={"resume": True}))
        )
    junk.output_dir.mkdir()
    (junk.output_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"variant 'junk': .*exists and holds no run"):
        plan_grid(grid)
    (junk.output_dir / "notes.txt").unlink()
    assert [action for _, action in plan_grid(grid)] == ["skip", "resume", "run", "run"]


def test_an_unfinished_variant_of_the_same_config_is_resumed_then_skipped(world, tmp_path):
    _, base = world
    grid = load_grid(data={"base": base, "output_dir": str(tmp_path / "g"), "variants": {"cut": {}}})
    (variant,) = grid.variants
    variant.output_dir.mkdir(parents=True)
    (variant.output_dir / "run.json").write_text(json.dumps({"status": "failed", "error": "killed"}))
    (variant.output_dir / "config.yaml").write_text(dump_config(variant.config))
    (result,) = run_grid(grid)
    assert result.status == "complete" and run_status(variant.output_dir) == "complete"
    assert yaml.safe_load((variant.output_dir / "config.yaml").read_text())["resume"] is True
    assert result.metrics == json.loads((variant.output_dir / "eval.json").read_text())
    assert [r.status for r in run_grid(grid)] == ["skipped"]


def test_write_comparison_writes_the_rows_it_is_given(tmp_path):
    rows = [
        {"variant": "teacher", "perplexity": 12.345678, "agreement": 1.0, "params": 1_000_000, "note": "a|b"},
        {"variant": "student-kd", "perplexity": 20.5, "agreement": 0.8125, "params": 250_000, "note": None},
        {"variant": "student-sft", "perplexity": None, "agreement": 0.5, "params": 250_000, "note": "x",
         "error": "diverged"},
    ]  # fmt: skip
    paths = write_comparison(rows, tmp_path / "cmp", ["perplexity", "agreement"], "LLM demo", stem="llm")

    def cell(value):
        if value is None:
            return "—"
        return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")

    columns = ["variant", "perplexity", "agreement", "params", "note"]
    expected = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    expected += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    assert paths.table == "\n".join(expected)
    markdown = paths.markdown.read_text()
    assert paths.markdown == tmp_path / "cmp" / "llm.md" and markdown.startswith("# LLM demo\n")
    assert "\n".join(expected) in markdown and "- `student-sft`: diverged" in markdown
    written = _csv_rows(paths.csv)
    assert list(written[0]) == [*columns, "error"]
    for row, line in zip(rows, written, strict=True):
        for key in [*columns, "error"]:
            value = row.get(key)
            assert line[key] == ("" if value is None else str(value)), key
    assert paths.png == tmp_path / "cmp" / "llm.png" and paths.png.read_bytes().startswith(PNG_SIGNATURE)

    # by default every numeric column is drawn; a metric that is no column is refused
    default = write_comparison(rows[:2], tmp_path / "default")
    assert default.table.splitlines()[0] == "| variant | perplexity | agreement | params | note |"
    assert default.png is not None
    assert write_comparison([{"variant": "a", "note": "x"}], tmp_path / "words").png is None
    from kdistill.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=r"metric 'bleu' is not a column"):
        write_comparison(rows, tmp_path / "bad", ["bleu"])
    with pytest.raises(InvalidArgumentError, match=r"row 0 has no 'variant'"):
        write_comparison([{"name": "x"}], tmp_path / "bad")


def test_count_saved_parameters_reads_the_safetensors_headers(tmp_path):
    model_dir = save_tiny_bert(tmp_path / "m", num_labels=2, layers=1, hidden=16)
    assert count_saved_parameters(model_dir) == _model_parameters(model_dir)
    assert count_saved_parameters(tmp_path) is None
    (model_dir / "model.safetensors").rename(model_dir / "adapter_model.safetensors")
    (model_dir / "adapter_config.json").write_text("{}")
    assert count_saved_parameters(model_dir) is None  # a LoRA adapter alone says nothing of the model's size
