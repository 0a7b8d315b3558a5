"""Bad input at the CLI: exit code 2, one line naming the problem, no traceback, no run passed off as complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import save_tiny_bert, sentiment_rows, write_csv, write_yaml

from kdistill.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    teacher = save_tiny_bert(root / "teacher", num_labels=2)
    small_teacher = save_tiny_bert(root / "small", num_labels=2, hidden=16, layers=2)
    other_vocab = root / "other-vocab"
    save_tiny_bert(other_vocab, num_labels=2)
    config = json.loads((other_vocab / "config.json").read_text())
    from conftest import make_tiny_bert

    # the same tokenizer, but an embedding with fewer rows than the tokenizer has ids
    make_tiny_bert(vocab=config["vocab_size"] - 40, num_labels=2).save_pretrained(other_vocab)
    train = write_csv(root / "train.csv", sentiment_rows(24, seed=1))
    bad_label = write_csv(root / "bad_label.csv", [*sentiment_rows(5), {"text": "so so", "label": "neutral"}])
    no_text = write_csv(root / "no_text.csv", [{"sentence": "good", "label": "positive"}])
    empty = root / "empty.csv"
    empty.write_text("text,label\n")
    return {"root": root, "teacher": teacher, "small": small_teacher, "other_vocab": other_vocab, "train": train,
            "bad_label": bad_label, "no_text": no_text, "empty": empty}  # fmt: skip


def config_text(world, *, train=None, teacher=None, extra="", out="run") -> str:
    return f"""task: sequence_classification
data:
  files: {{train: {train or world["train"]}}}
  label_names: [negative, positive]
teacher: {{path: {teacher or world["teacher"]}}}
student: {{kind: from_teacher, layers: [0, 3]}}
training: {{max_steps: 2, batch_size: 8, log_with: [], progress: false}}
output_dir: {world["root"] / out}
{extra}"""


CASES = {
    "malformed yaml": (lambda w: "task: [unclosed\n", [], "not valid YAML at line"),
    "top level not a mapping": (lambda w: "- a\n- b\n", [], "must hold a mapping"),
    "unknown key": (lambda w: config_text(w, extra="trainig: {}\n"), [], "unknown key 'trainig'; did you mean 'training'"),
    "unknown nested key": (lambda w: config_text(w), ["distill.temprature=2"], "did you mean 'distill.temperature'"),
    "wrong type": (lambda w: config_text(w), ["training.batch_size=many"], "training.batch_size"),
    "negative temperature": (lambda w: config_text(w), ["distill.temperature=-1"], "distill.temperature: must be a number > 0"),
    "missing task": (lambda w: config_text(w).replace("task: sequence_classification\n", ""), [], "missing required key 'task'"),
    "bad override syntax": (lambda w: config_text(w), ["training.batch_size"], "is not of the form key=value"),
    "unknown loss": (lambda w: config_text(w), ["distill.kd_loss=klx"], "unknown loss 'klx'"),
    "unknown task": (lambda w: config_text(w), ["task=summarization"], "task: Input should be"),
    "missing data file": (lambda w: config_text(w, train=w["root"] / "nope.csv"), [], "nope.csv"),
    "empty dataset": (lambda w: config_text(w, train=w["empty"]), [], "empty"),
    "label outside label set": (lambda w: config_text(w, train=w["bad_label"]), [], "'neutral'"),
    "text column absent": (lambda w: config_text(w, train=w["no_text"]), [], "'text'"),
    "missing teacher model": (lambda w: config_text(w, teacher=w["root"] / "no-model"), [], "teacher.path"),
    "vocab mismatch without policy": (
        lambda w: config_text(w, extra="student: {kind: pretrained, path: " + str(w["other_vocab"]) + "}\n"
                              ).replace("student: {kind: from_teacher, layers: [0, 3]}\n", ""),
        [], "vocabulary has 50 entries but its tokenizer has 90"),
    "hidden size mismatch without projection": (
        lambda w: config_text(w, extra="student: {kind: pretrained, path: " + str(w["small"]) + "}\n"
                              "distill: {layer_map: [[4, 2]], layer_map_projection: none}\n"
                              ).replace("student: {kind: from_teacher, layers: [0, 3]}\n", ""),
        [], "16"),
    "layer out of range": (lambda w: config_text(w), ["student.layers=[0, 9]"], "9"),
    "split ratios not summing to one": (lambda w: config_text(w), ["data.split_ratios={train: 0.5, validation: 0.2}"],
                                        "sum to 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(world, case, capsys):
    build, overrides, expected = CASES[case]
    out = f"run-{abs(hash(case)) % 10**8}"
    path = write_yaml(world["root"] / f"{out}.yaml", build(world).replace(str(world["root"] / "run"),
                                                                          str(world["root"] / out)))  # fmt: skip
    code = main(["train", str(path), *overrides])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kdistill: error: ")
    assert expected.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in captured.err + captured.out
    run_json = Path(world["root"] / out / "run.json")
    assert not run_json.exists() or json.loads(run_json.read_text())["status"] != "complete"


def test_debug_flag_shows_the_traceback(world, capsys):
    path = write_yaml(world["root"] / "debug.yaml", config_text(world))
    assert main(["--debug", "train", str(path), "distill.kd_loss=klx"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_eval_of_an_incomplete_run_is_refused(world, capsys):
    run_dir = world["root"] / "half"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"status": "running"}))
    (run_dir / "config.yaml").write_text(config_text(world, out="half"))
    assert main(["eval", str(run_dir)]) == 2
    assert "not a complete run" in capsys.readouterr().err


def test_missing_config_file(world, capsys):
    assert main(["train", str(world["root"] / "absent.yaml")]) == 2
    assert "absent.yaml does not exist" in capsys.readouterr().err
