"""Bad input to every command (train, compare, cache, generate, experiment, report, params, eval): exit code 2, one
line naming the problem, no traceback, and every file already there unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cli_support import QUIET, save_tiny_bert, sentiment_rows, write_conll, write_csv, write_yaml

from kdistill.cli import main


def _llama_dir(directory: Path) -> Path:
    from conftest import make_tiny_chat_tokenizer, make_tiny_llama

    make_tiny_chat_tokenizer().save_pretrained(directory)
    make_tiny_llama().save_pretrained(directory)
    return directory


def _adapter_dir(base: Path, directory: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():  # peft starts lora_B at zero, an adapter that changes nothing: make it count
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-commands")
    w = {"root": root}
    w["teacher"] = save_tiny_bert(root / "teacher", num_labels=2)
    w["three_labels"] = save_tiny_bert(root / "three-labels", num_labels=3)
    w["ner_teacher"] = save_tiny_bert(root / "ner-teacher", task="token", num_labels=5)
    w["train"] = write_csv(root / "train.csv", sentiment_rows(24, seed=1))
    w["test"] = write_csv(root / "test.csv", sentiment_rows(12, seed=2))
    w["conll"] = write_conll(root / "train.conll", 12, seed=1)
    w["llama"] = _llama_dir(root / "llama")
    w["adapter"] = _adapter_dir(w["llama"], root / "llama-adapter")
    w["chat"] = root / "chat.jsonl"
    w["chat"].write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "hi"}]}
            )
            + "\n"
            for i in range(8)
        )
    )
    w["prompts"] = root / "prompts.jsonl"
    w["prompts"].write_text('{"prompt": "hello"}\n')
    w["latin1"] = root / "latin1.jsonl"
    w["latin1"].write_bytes(b'{"prompt": "caf\xe9"}\n')
    w["file"] = root / "a-file.txt"
    w["file"].write_text("a user's file\n")
    w["cls_yaml"] = write_yaml(root / "cls.yaml", cls_config(w, out="cls-run"))
    assert main(["train", str(w["cls_yaml"])]) == 0
    w["cls_run"] = root / "cls-run"
    ner_yaml = write_yaml(root / "ner.yaml", ner_config(w))
    assert main(["train", str(ner_yaml)]) == 0
    w["ner_run"] = root / "ner-run"
    w["lm_yaml"] = write_yaml(root / "lm.yaml", lm_config(w, out="lm-never"))
    w["grid"] = write_yaml(root / "grid.yaml", f"base: {w['cls_yaml']}\noutput_dir: {root / 'grid'}\n"
                           "variants: {a: {distill.kd_weight: 0.9}}\n")  # fmt: skip
    return w


def cls_config(w, *, out: str, extra: str = "") -> str:
    return f"""task: sequence_classification
data:
  files: {{train: {w["train"]}, test: {w["test"]}}}
  label_names: [negative, positive]
teacher: {{path: {w["teacher"]}}}
student: {{kind: from_teacher, layers: [0, 3]}}
training: {{max_steps: 2, batch_size: 8, log_with: [], progress: false}}
output_dir: {w["root"] / out}
{extra}"""


def ner_config(w) -> str:
    return f"""task: token_classification
data:
  files: {{train: {w["conll"]}, test: {w["conll"]}}}
  label_names: [O, B-PER, I-PER, B-LOC, I-LOC]
teacher: {{path: {w["ner_teacher"]}}}
student: {{kind: from_teacher, layers: [0, 3]}}
training:
  max_steps: 2
  batch_size: 8
{QUIET}output_dir: {w["root"] / "ner-run"}
"""


def lm_config(w, *, out: str) -> str:
    return f"""task: causal_lm
data: {{files: {{train: {w["chat"]}, validation: {w["chat"]}}}, max_length: 32}}
teacher: {{path: {w["llama"]}}}
student: {{kind: from_teacher, layers: [0, 3]}}
training:
  max_steps: 2
  batch_size: 4
{QUIET}output_dir: {w["root"] / out}
"""


def train(text, *overrides):
    """argv for ``kdistill train`` of the config ``text(w)`` (written to a file of its own)."""

    def argv(w):
        body = text(w)
        name = hashlib.sha256((body + repr(overrides)).encode()).hexdigest()[:10]
        body = body.replace("/never\n", f"/never-{name}\n").replace("/lm-never\n", f"/lm-never-{name}\n")
        return ["train", str(write_yaml(w["root"] / f"case-{name}.yaml", body)), *overrides]

    return argv


def cls(*overrides, extra=""):
    return train(lambda w: cls_config(w, out="never", extra=extra), *overrides)


def lm(*overrides):
    return train(lambda w: lm_config(w, out="lm-never"), *overrides)


CASES = {
    # train: the config
    "unknown kd_kwargs key": (cls("distill.kd_kwargs={skw: 0.1}"), "kd_kwargs={'skw': 0.1} do not fit kd_loss='forward_kl'"),
    "unknown lr scheduler": (cls("training.lr_scheduler=cosinus"), "training.lr_scheduler: unknown scheduler 'cosinus'"),
    "temperature schedule below zero": (cls("distill.temperature={name: linear, start: 2.0, end: -1.0}"), "temperature: the schedule reaches -1.0"),
    "weight schedule unknown": (cls("distill.kd_weight={name: linear, start: 1.0, end: -0.5}"), "kd weight: the schedule reaches -0.5"),
    "weight schedule unknown name": (cls("distill.kd_weight={name: wobble, start: 1.0, end: 0.0}"), "unknown schedule 'wobble'"),
    "fsp as a match": (cls(extra="distill: {matches: [{teacher: 'layer 2', student: 'layer 1', loss: fsp}]}\n"), "match loss 'fsp' takes 4 features"),
    "negative eval batch size": (cls("training.eval_batch_size=0"), "training.eval_batch_size"),
    "mixed precision unknown": (cls("training.mixed_precision=fp8"), "training.mixed_precision"),
    "output_dir is a file": (cls(), "is a file; it must be a directory"),
    "output_dir under a file": (cls(), "which is a file"),
    "teacher not local and no hub id": (cls("teacher.path=./no/such/teacher"), "teacher.path ./no/such/teacher does not exist"),
    "student path missing": (cls("student={kind: pretrained, path: /no/such/student}"), "student.path"),
    "label outside label_names": (cls("data.label_names=[bad, good]"), "is not in the label set ['bad', 'good']"),
    # train: causal LM
    "causal lm unknown vocab policy": (lm("distill.kd_kwargs={vocab_policy: chop}"), "chop"),
    "causal lm unknown kd loss": (lm("distill.kd_loss=jsdx"), "unknown loss 'jsdx'"),
    "causal lm data file missing": (lm("data.files.train=/no/such.jsonl"), "/no/such.jsonl"),
    # compare
    "compare a run that does not exist": (lambda w: ["compare", str(w["root"] / "no-run")], "no-run"),
    "compare a student with another label count": (lambda w: ["compare", str(w["cls_run"]), str(w["three_labels"])], "3 labels"),
    "compare --out a file": (lambda w: ["compare", str(w["cls_run"]), "--out", str(w["file"])], "is a file"),
    "compare --teacher missing": (lambda w: ["compare", "--teacher", str(w["root"] / "ghost"), "--student", str(w["teacher"]), "--data", str(w["cls_yaml"])], "--teacher"),
    "compare --teacher without --data": (lambda w: ["compare", "--teacher", str(w["teacher"]), "--student", str(w["teacher"])], "--data"),
    "compare unknown split": (lambda w: ["compare", str(w["cls_run"]), "--split", "dev"], "dev"),
    "compare bad override": (lambda w: ["compare", str(w["cls_run"]), "data.limit"], "data.limit"),
    # cache
    "cache --out a file": (lambda w: ["cache", str(w["cls_yaml"]), "--out", str(w["file"])], "is a file"),
    "cache missing config": (lambda w: ["cache", str(w["root"] / "none.yaml"), "--out", str(w["root"] / "c")], "none.yaml does not exist"),
    "cache bad k": (lambda w: ["cache", str(w["cls_yaml"]), "--out", str(w["root"] / "c"), "--k", "0"], "--k"),
    # generate
    "generate prompts not utf-8": (lambda w: ["generate", "--teacher", str(w["llama"]), "--prompts", str(w["latin1"]), "--out", str(w["root"] / "g.jsonl")], "is not UTF-8"),
    "generate --out a directory": (lambda w: ["generate", "--teacher", str(w["llama"]), "--prompts", str(w["prompts"]), "--out", str(w["root"])], "is a directory"),
    "generate a classifier teacher": (lambda w: ["generate", "--teacher", str(w["teacher"]), "--prompts", str(w["prompts"]), "--out", str(w["root"] / "g2.jsonl")], "is a BertForSequenceClassification, not a causal language model"),
    "generate batch size 0": (lambda w: ["generate", "--teacher", str(w["llama"]), "--prompts", str(w["prompts"]), "--out", str(w["root"] / "g3.jsonl"), "--batch-size", "0"], "batch_size must be >= 1"),
    "generate missing prompts": (lambda w: ["generate", "--teacher", str(w["llama"]), "--prompts", str(w["root"] / "none.jsonl"), "--out", str(w["root"] / "g4.jsonl")], "does not exist"),
    # experiment
    "experiment missing grid": (lambda w: ["experiment", str(w["root"] / "no-grid.yaml")], "no-grid.yaml"),
    "experiment variant key unknown": (lambda w: ["experiment", str(w["grid"]), "distill.temprature=3"], "distill.temperature"),
    "experiment output dir a file": (lambda w: ["experiment", str(w["grid"]), "--output-dir", str(w["file"])], "is a file"),
    # report, params, eval
    "report of no run": (lambda w: ["report", str(w["root"] / "no-run")], "no-run"),
    "report of a file": (lambda w: ["report", str(w["file"])], "a-file.txt"),
    "params depth -1": (lambda w: ["params", str(w["teacher"]), "--depth", "-1"], "--depth"),
    "params missing model": (lambda w: ["params", str(w["root"] / "ghost")], "ghost"),
    "eval of no run": (lambda w: ["eval", str(w["root"] / "no-run")], "no-run"),
    "eval unknown split": (lambda w: ["eval", str(w["cls_run"]), "--split", "dev"], "dev"),
}  # fmt: skip

# cases whose output_dir must already be a file, or sit under one, before the run
OUTPUT_DIR_OVERRIDE = {"output_dir is a file": "{file}", "output_dir under a file": "{file}/run"}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(world, case, capsys):
    build, expected = CASES[case]
    argv = build(world)
    if case in OUTPUT_DIR_OVERRIDE:
        argv.append("output_dir=" + OUTPUT_DIR_OVERRIDE[case].format(file=world["file"]))
    before = _snapshot(world["root"])
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kdistill: error: "), lines[0]
    assert expected.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in captured.err + captured.out
    after = _snapshot(world["root"])
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, changed  # nothing already there was rewritten or removed
    assert not any(Path(p).name == "run.json" for p in set(after) - set(before)), sorted(set(after) - set(before))


def test_compare_of_a_token_classification_run(world, capsys):
    assert (
        main(["compare", str(world["ner_run"]), "--split", "test", "--out", str(world["root"] / "ner-compare")]) == 0
    )
    scores = json.loads((world["root"] / "ner-compare" / "compare.json").read_text())
    assert scores["significance"]["examples"] > 0  # resampled by sentence
    for row in scores["models"]:  # each model's entity F1 with its interval, the point from the same counts
        interval = scores["significance"]["models"][row["name"]]["f1"]
        assert interval["value"] == pytest.approx(row["metrics"]["f1"], abs=1e-12)
        assert (
            row["metrics_ci"]["f1"] == interval["ci"] and interval["ci"][0] <= interval["value"] <= interval["ci"][1]
        )


def test_there_are_enough_kinds_of_bad_input(world):
    from test_bad_input import CASES as TRAIN_CASES

    assert len(CASES) >= 40 and len(CASES) + len(TRAIN_CASES) >= 55
    commands = {build(world)[0] for build, _ in CASES.values()}
    assert commands >= {"train", "compare", "cache", "generate", "experiment", "report", "params", "eval"}


def test_a_lora_tuned_teacher_gives_a_from_teacher_student_its_tuned_weights(world):
    """``teacher.adapter`` with ``student.kind: from_teacher``: the student is cut from the teacher with its adapter
    merged (it was a peft TypeError)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kdistill.models.students import from_teacher

    text = lm_config(world, out="lora-teacher").replace(
        f"teacher: {{path: {world['llama']}}}", f"teacher: {{path: {world['llama']}, adapter: {world['adapter']}}}"
    )
    path = write_yaml(world["root"] / "lora-teacher.yaml", text)
    assert main(["train", str(path), "training.learning_rate=1e-12", "training.max_steps=1"]) == 0
    student = AutoModelForCausalLM.from_pretrained(world["root"] / "lora-teacher" / "student")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["llama"]), world["adapter"])
    expected = from_teacher(tuned.merge_and_unload(), [0, 3]).state_dict()
    untuned = from_teacher(AutoModelForCausalLM.from_pretrained(world["llama"]), [0, 3]).state_dict()
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(expected[query], untuned[query], atol=1e-3)  # the adapter changed what was copied
