"""Black-box distillation data: the teacher completes prompts into a resumable jsonl (kdistill.generation)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_tiny_chat_tokenizer, make_tiny_llama
from kdistill.cli import generate as generate_cli
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.generation import (
    GenerationParams,
    HFTeacher,
    OpenAITeacher,
    generate_dataset,
    meta_path,
    read_prompts,
)

PROMPTS = [
    {"id": "greet", "prompt": "hello , how are you ?"},
    {"instruction": "say a good word", "input": "about the day"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "what is your name ?"}]},
    {"id": 7, "prompt": "tell me what you think"},
    {"prompt": "do you like this ?"},
    {"id": "last", "instruction": "help me"},
]  # fmt: skip
EXPECTED_IDS = ["greet", 2, 3, 7, 5, "last"]  # the record's id, else its line number


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "tiny-llama"
    make_tiny_llama().save_pretrained(path)
    make_tiny_chat_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def run_cli(argv: list[str]) -> int:
    """The real CLI's dispatch for one subcommand: parse, run, a KdistillError is exit code 2."""
    parser = argparse.ArgumentParser(prog="kdistill")
    generate_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KdistillError as error:
        print(f"kdistill: error: {error}", file=sys.stderr)
        return 2


GREEDY = GenerationParams(max_new_tokens=6, do_sample=False)
SAMPLED = GenerationParams(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=3)


# ---------------------------------------------------------------------------------------------------- prompts
def test_read_prompts_ids_fields_and_system_prompt(prompts_file: Path) -> None:
    prompts = read_prompts(prompts_file, system_prompt="be kind")
    assert [p.id for p in prompts] == EXPECTED_IDS
    assert prompts[1].messages == [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "say a good word\n\nabout the day"},
    ]
    assert [m["role"] for m in prompts[2].messages] == ["system", "user", "assistant", "user"]
    assert prompts[5].messages[-1] == {"role": "user", "content": "help me"}
    assert [p.id for p in read_prompts(prompts_file, limit=2)] == ["greet", 2]


def test_read_prompts_named_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "why ?", "prompt": "ignored"}])
    assert read_prompts(path, prompt_field="question")[0].messages == [{"role": "user", "content": "why ?"}]
    with pytest.raises(InvalidArgumentError, match=r"line 1: the record has no 'answer' field"):
        read_prompts(path, prompt_field="answer")


BAD_PROMPTS = {
    "bad json": ('{"prompt": "a"}\n{"prompt": "b"\n', r"line 2 is not valid JSON"),
    "no prompt field": ('{"prompt": "a"}\n\n{"text": "b"}\n', r"line 3: the record has none of 'messages', 'prompt'"),
    "not an object": ('["a"]\n', r"line 1 must be a JSON object"),
    "empty prompt": ('{"prompt": "  "}\n', r"line 1: 'prompt' must be a non-empty string"),
    "ends with assistant": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
        r"line 1: 'messages' must end with a user turn",
    ),
    "bad turn": ('{"messages": [{"role": "robot", "content": "a"}]}\n', r"line 1: messages turn 1 must be"),
    "same id": ('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', r"2: id 'x' was already used on line 1"),
    "id as a line number": ('{"prompt": "a"}\n{"id": 1, "prompt": "b"}\n', r"2: id 1 was already used on line 1"),
    "bad id": ('{"id": [1], "prompt": "a"}\n', r"line 1: 'id' must be a string or an integer"),
    "empty file": ("\n", r"holds no prompts"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompts_name_the_line(tmp_path: Path, case: str) -> None:
    text, message = BAD_PROMPTS[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError, match=message):
        read_prompts(path)


def test_bad_prompts_at_the_cli_exit_2_before_loading_the_teacher(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{oops}\n')
    code = run_cli(["generate", "--teacher", str(tmp_path / "no-such-model"), "--prompts", str(path),
                    "--out", str(tmp_path / "out.jsonl")])  # fmt: skip
    assert code == 2
    assert "bad.jsonl line 2 is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 2, "do_sample": False}, "num_samples=2 needs sampling"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ],
)
def test_bad_generation_params(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        GenerationParams(**kwargs)


# ---------------------------------------------------------------------------------------------------- hf backend
def test_hf_generation_writes_each_prompt_once(teacher_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = generate_dataset(
        prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, batch_size=4, system_prompt="be kind", progress=None
    )
    records = read_jsonl(out)
    assert (result.total, result.skipped, result.lines_written) == (6, 0, 6)
    assert [r["id"] for r in records] == EXPECTED_IDS
    tokenizer = make_tiny_chat_tokenizer()
    for record, prompt in zip(records, read_prompts(prompts_file, system_prompt="be kind"), strict=True):
        assert record["messages"][:-1] == prompt.messages
        assert record["messages"][-1] == {"role": "assistant", "content": record["completion"]}
        assert record["prompt"] == tokenizer.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=False
        )
        assert (record["teacher"], record["sample"]) == (str(teacher_dir), 0)
        assert record["completion"] == record["completion"].strip()
    assert any(r["completion"] for r in records)  # the random teacher stops at eos now and then, not always at once
    meta = json.loads(meta_path(out).read_text())
    assert meta["backend"] == "hf" and meta["teacher"] == str(teacher_dir)
    assert (meta["max_new_tokens"], meta["do_sample"], meta["temperature"], meta["system_prompt"]) == (
        6,
        False,
        None,
        "be kind",
    )


def test_output_is_sft_data_for_the_student(teacher_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    """``render_sft`` takes the records as they are and learns exactly the teacher's completions."""
    from kdistill.data.sft import render_sft

    out = tmp_path / "out.jsonl"
    generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, batch_size=6, progress=None)
    records = read_jsonl(out)
    tokenizer = make_tiny_chat_tokenizer()
    examples = render_sft(records, tokenizer, max_length=64)
    assert len(examples) == len(records) and examples.dropped == 0
    for record, example in zip(records, examples, strict=True):
        if len(record["messages"]) > 2:  # an earlier assistant turn is learned too
            continue
        assert tokenizer.decode(example["input_ids"][: example["prompt_length"]]) == tokenizer.decode(
            tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        )  # the student's prompt is the teacher's
        learned = [token for token in example["labels"] if token != -100]
        assert tokenizer.decode(learned, skip_special_tokens=True).strip() == record["completion"]


def test_hf_completion_is_the_decoded_new_tokens(teacher_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    """A prompt alone in its batch (no padding) gives exactly what ``model.generate`` continues it with."""
    out = tmp_path / "out.jsonl"
    generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, batch_size=1, limit=2, progress=None)
    model, tokenizer = make_tiny_llama(), make_tiny_chat_tokenizer()
    for record in read_jsonl(out):
        ids = tokenizer(record["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
        assert record["completion"] == tokenizer.decode(generated, skip_special_tokens=True).strip()


def test_hf_left_padding_does_not_change_greedy_text(teacher_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    alone, together = tmp_path / "alone.jsonl", tmp_path / "together.jsonl"
    generate_dataset(prompts_file, alone, HFTeacher(str(teacher_dir)), GREEDY, batch_size=1, progress=None)
    generate_dataset(prompts_file, together, HFTeacher(str(teacher_dir)), GREEDY, batch_size=6, progress=None)
    assert [r["completion"] for r in read_jsonl(alone)] == [r["completion"] for r in read_jsonl(together)]


def test_hf_seeded_sampling_repeats_and_samples_differ(teacher_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    params = GenerationParams(max_new_tokens=8, temperature=1.5, top_p=1.0, seed=1, num_samples=3)
    runs = {}
    before = torch.random.get_rng_state()
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / f"{name}.jsonl"
        seeded = GenerationParams(**{**params.meta(), "seed": seed})
        generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), seeded, batch_size=4, progress=None)
        runs[name] = read_jsonl(out)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is left alone
    assert [(r["id"], r["sample"]) for r in runs["a"]] == [(i, s) for i in EXPECTED_IDS for s in range(3)]
    assert runs["a"] == runs["b"]
    assert [r["completion"] for r in runs["a"]] != [r["completion"] for r in runs["c"]]
    assert len({r["completion"] for r in runs["a"]}) > len(PROMPTS)  # the samples of a prompt are not all one text


def test_hf_raw_text_without_chat_template(tmp_path: Path, prompts_file: Path) -> None:
    teacher = tmp_path / "plain"
    make_tiny_llama().save_pretrained(teacher)
    tokenizer = make_tiny_chat_tokenizer()
    tokenizer.chat_template = None
    tokenizer.pad_token = None  # the pad token becomes eos
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "out.jsonl"
    generate_dataset(prompts_file, out, HFTeacher(str(teacher)), GREEDY, batch_size=3, progress=None)
    records = read_jsonl(out)
    assert records[0]["prompt"] == "hello , how are you ?"
    assert records[1]["prompt"] == "say a good word\n\nabout the day"
    assert len(records) == len(PROMPTS)


def test_gguf_file_is_loaded_as_float32(monkeypatch, tmp_path: Path, prompts_file: Path) -> None:
    import transformers

    calls: dict[str, dict[str, Any]] = {}

    def fake(kind: str, build):
        def from_pretrained(path: str, **kwargs: Any):
            calls[kind] = {"path": path, **kwargs}
            return build()

        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer", make_tiny_chat_tokenizer))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model", make_tiny_llama))
    teacher = HFTeacher("some/repo", gguf_file="model-q4.gguf")
    generate_dataset(prompts_file, tmp_path / "o.jsonl", teacher, GREEDY, limit=1, progress=None)
    assert calls["model"] == {"path": "some/repo", "gguf_file": "model-q4.gguf", "dtype": torch.float32}
    assert calls["tokenizer"] == {"path": "some/repo", "gguf_file": "model-q4.gguf"}
    assert json.loads(meta_path(tmp_path / "o.jsonl").read_text())["gguf_file"] == "model-q4.gguf"


def test_missing_teacher_is_a_kdistill_error(tmp_path: Path, prompts_file: Path) -> None:
    with pytest.raises(KdistillError, match=r"teacher .*no-such-dir does not exist \(no such directory here"):
        generate_dataset(prompts_file, tmp_path / "o.jsonl", HFTeacher(str(tmp_path / "no-such-dir")), progress=None)


# ---------------------------------------------------------------------------------------------------- resumption
KILLED_RUN = """
import os, sys
from kdistill.generation import GenerationParams, HFTeacher, generate_dataset
batches = []
def progress(done, total):
    batches.append(done)
    if len(batches) == 2:
        os._exit(137)  # killed right after the second batch was appended
params = GenerationParams(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=3)
generate_dataset(sys.argv[1], sys.argv[2], HFTeacher(sys.argv[3]), params, batch_size=2, progress=progress)
"""


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_killed_run_resumes_to_the_uninterrupted_output(teacher_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    generate_dataset(prompts_file, reference, HFTeacher(str(teacher_dir)), SAMPLED, batch_size=2, progress=None)
    reference_lines = reference.read_text().splitlines(keepends=True)
    assert len(reference_lines) == len(PROMPTS)

    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(prompts_file), str(out), str(teacher_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 137, killed.stderr
    before_kill = out.read_text()
    assert before_kill == "".join(reference_lines[:4])  # two whole batches, nothing else
    with out.open("a") as file:  # what a kill in the middle of the third batch's write would leave
        file.write(reference_lines[4][:25])

    result = generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), SAMPLED, batch_size=2, progress=None)
    assert (result.skipped, result.lines_written) == (4, 2)
    assert out.read_text() == reference.read_text()
    assert [r["id"] for r in read_jsonl(out)] == EXPECTED_IDS
    again = generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), SAMPLED, batch_size=2, progress=None)
    assert (again.skipped, again.lines_written) == (6, 0)
    assert out.read_text() == reference.read_text()


def test_partly_written_batch_is_completed_line_for_line(
    teacher_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """A batch cut inside a prompt's samples: the batch is generated again and only its missing lines appended."""
    params = GenerationParams(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=5, num_samples=2)
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    generate_dataset(prompts_file, reference, HFTeacher(str(teacher_dir)), params, batch_size=3, progress=None)
    lines = reference.read_text().splitlines(keepends=True)
    assert len(lines) == 2 * len(PROMPTS)
    out.write_text("".join(lines[:7]) + lines[7][:-10])  # batch 0 whole, batch 1: 1 prompt and a half, torn
    meta_path(out).write_text(meta_path(reference).read_text())
    generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), params, batch_size=3, progress=None)
    assert out.read_text() == reference.read_text()


def test_progress_counts_prompts(teacher_dir: Path, prompts_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.jsonl"
    seen: list[tuple[int, int]] = []
    generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, batch_size=4, limit=5,
                     progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert seen == [(4, 5), (5, 5)]
    generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, batch_size=4)
    err = capsys.readouterr().err
    assert "resuming, 5 of 6 prompts already in" in err and "generate: 6/6 prompts" in err


class EchoTeacher:
    """A teacher without a model: its completions hold characters a line-based reader could split on."""

    name = "echo"

    def meta(self) -> dict[str, Any]:
        return {"backend": "echo"}

    def render(self, messages: list[dict[str, str]]) -> str:
        return messages[-1]["content"]

    def generate(self, prompts: list[Any], params: GenerationParams, batch_index: int) -> list[list[str]]:
        return [[f"{p.id} \u2028 \x85 ü {batch_index}.{s}" for s in range(params.num_samples)] for p in prompts]


def test_resume_with_line_separators_inside_completions(prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    generate_dataset(prompts_file, out, EchoTeacher(), GREEDY, batch_size=2, limit=3, progress=None)
    result = generate_dataset(prompts_file, out, EchoTeacher(), GREEDY, batch_size=2, progress=None)
    assert (result.skipped, result.lines_written) == (3, 3)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")[:-1]]
    assert [r["id"] for r in records] == EXPECTED_IDS
    assert records[3]["completion"] == "7 \u2028 \x85 ü 1.0"  # batch 1 was generated again; its first line kept


# ---------------------------------------------------------------------------------------------------- meta, output
def test_other_parameters_are_refused_unless_overwrite(teacher_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, limit=2, progress=None)
    first = out.read_text()
    hotter = GenerationParams(max_new_tokens=6, temperature=0.9)
    with pytest.raises(InvalidArgumentError, match=r"generated with do_sample=False, not True"):
        generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), hotter, progress=None)
    with pytest.raises(InvalidArgumentError, match=r"generated with system_prompt=None, not 'be brief'"):
        generate_dataset(
            prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, system_prompt="be brief", progress=None
        )
    assert out.read_text() == first  # refused before anything was written
    # greedy ignores temperature and top_p: another value of either is the same run
    same = GenerationParams(max_new_tokens=6, do_sample=False, temperature=0.1, top_p=0.5)
    result = generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), same, progress=None)
    assert (result.skipped, result.lines_written) == (2, 4)
    generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), hotter, overwrite=True, limit=1, progress=None)
    assert len(read_jsonl(out)) == 1
    assert json.loads(meta_path(out).read_text())["do_sample"] is True


def test_a_sampled_resume_with_another_batch_size_is_refused(teacher_dir: Path, prompts_file: Path, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), SAMPLED, batch_size=4, limit=2, progress=None)
    first = out.read_bytes()
    with pytest.raises(InvalidArgumentError, match=r"generated with batch_size=4, not 2"):
        generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), SAMPLED, batch_size=2, progress=None)
    assert out.read_bytes() == first
    greedy = tmp_path / "greedy.jsonl"  # greedy text does not depend on the batch's seed: any batch size resumes
    generate_dataset(prompts_file, greedy, HFTeacher(str(teacher_dir)), GREEDY, batch_size=4, limit=2, progress=None)
    result = generate_dataset(prompts_file, greedy, HFTeacher(str(teacher_dir)), GREEDY, batch_size=2, progress=None)
    assert (result.skipped, result.lines_written) == (2, 4)


def test_a_second_writer_of_one_out_is_refused_naming_the_holder(
    teacher_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    lock = out.with_name("out.jsonl.lock")
    code = (
        "import time; from kdistill._lock import exclusive\n"
        f"with exclusive({str(out)!r}, {str(lock)!r}):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        message = rf"out.jsonl is in use by another kdistill process \(pid {holder.pid}"
        with pytest.raises(KdistillError, match=message):
            generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, progress=None)
        assert not out.exists() and not meta_path(out).exists()
    finally:
        holder.kill()
        holder.wait()
    result = generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, progress=None)  # stale: taken
    assert result.lines_written == len(PROMPTS) and not lock.exists()


def test_out_that_is_a_directory_or_prompts_not_utf8_are_refused(
    teacher_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgumentError, match=r"--out .* is a directory; give the jsonl file"):
        generate_dataset(prompts_file, tmp_path, HFTeacher(str(teacher_dir)), GREEDY, progress=None)
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(InvalidArgumentError, match=r"latin1.jsonl line 2 is not UTF-8 \(byte 0xe9\)"):
        read_prompts(latin)


def test_output_without_meta_or_with_foreign_lines_is_refused(
    teacher_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    out = write_jsonl(tmp_path / "out.jsonl", [{"text": "someone else's data"}])
    with pytest.raises(InvalidArgumentError, match=r"exists without out.jsonl.meta.json"):
        generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, progress=None)
    generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, limit=1, overwrite=True, progress=None)
    with out.open("a") as file:
        file.write("not json\n")
    with pytest.raises(InvalidArgumentError, match=r"out.jsonl line 2 is not a generated record"):
        generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, progress=None)


# ---------------------------------------------------------------------------------------------------- cli
def test_cli_hf(teacher_dir: Path, prompts_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "out.jsonl"
    argv = ["generate", "--teacher", str(teacher_dir), "--prompts", str(prompts_file), "--out", str(out),
            "--batch-size", "4", "--max-new-tokens", "5", "--seed", "2", "--num-samples", "2",
            "--limit", "3"]  # fmt: skip
    assert run_cli(argv) == 0
    records = read_jsonl(out)
    assert [(r["id"], r["sample"]) for r in records] == [("greet", 0), ("greet", 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    meta = json.loads(meta_path(out).read_text())
    assert (meta["temperature"], meta["top_p"], meta["seed"], meta["num_samples"]) == (0.7, 0.95, 2, 2)
    assert "3 prompts: 0 already done, 6 lines written" in capsys.readouterr().out
    assert run_cli([*argv, "--greedy", "--num-samples", "1"]) == 2
    assert "generated with do_sample=True, not False" in capsys.readouterr().err
    assert run_cli(["generate", "--prompts", str(prompts_file), "--out", str(out)]) == 2
    assert "--teacher is required" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- openai backend
class StubServer(ThreadingHTTPServer):
    """An OpenAI-compatible ``/v1/chat/completions`` that echoes the last user turn; scripted failures first."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.requests: list[dict[str, Any]] = []
        self.failures: list[int] = []  # statuses answered, one each, before any success
        self.api_key: str | None = "sk-test"
        self.max_choices = 100  # a server that ignores n > 1 answers one choice

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class StubHandler(BaseHTTPRequestHandler):
    server: StubServer

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path != "/v1/chat/completions":
            return self._answer(404, {"error": {"message": f"no route {self.path}"}})
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            return self._answer(401, {"error": {"message": "Incorrect API key provided"}})
        if self.server.failures:
            return self._answer(self.server.failures.pop(0), {"error": {"message": "overloaded"}})
        question, request = body["messages"][-1]["content"], len(self.server.requests)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": f" echo {question} #{request}.{i} "}}
            for i in range(min(body["n"], self.server.max_choices))
        ]  # fmt: skip
        return self._answer(200, {"choices": choices[::-1]})  # out of order: the client sorts by index


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_openai_backend_with_a_retry(stub: StubServer, prompts_file: Path, tmp_path: Path, capsys) -> None:
    stub.failures = [500]
    teacher = OpenAITeacher("stub-model", api_base=stub.api_base, api_key="sk-test", backoff_s=0.01)
    out = tmp_path / "out.jsonl"
    params = GenerationParams(max_new_tokens=12, temperature=0.5, top_p=0.9, num_samples=2)
    generate_dataset(prompts_file, out, teacher, params, batch_size=4, system_prompt="be kind", progress=None)
    records = read_jsonl(out)
    assert [(r["id"], r["sample"]) for r in records] == [(i, s) for i in EXPECTED_IDS for s in range(2)]
    assert len(stub.requests) == len(PROMPTS) + 1  # the first attempt failed with 500 and was repeated
    assert "HTTP 500: overloaded; retrying" in capsys.readouterr().err
    first = stub.requests[1]
    assert first["auth"] == "Bearer sk-test"
    assert first["body"] == {
        "model": "stub-model",
        "messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello , how are you ?"}],
        "max_tokens": 12,
        "temperature": 0.5,
        "top_p": 0.9,
        "n": 2,
    }
    assert records[0]["completion"] == "echo hello , how are you ? #2.0"
    assert records[1]["completion"] == "echo hello , how are you ? #2.1"
    assert records[0]["messages"][-1] == {"role": "assistant", "content": records[0]["completion"]}
    assert records[0]["prompt"] == "hello , how are you ?"
    assert records[0]["teacher"] == "stub-model"


def test_openai_server_that_ignores_n_is_asked_again(stub: StubServer, prompts_file: Path, tmp_path: Path) -> None:
    stub.max_choices = 1
    teacher = OpenAITeacher("m", api_base=stub.api_base, api_key="sk-test")
    params = GenerationParams(max_new_tokens=4, num_samples=3)
    generate_dataset(prompts_file, tmp_path / "o.jsonl", teacher, params, limit=1, progress=None)
    assert [r["body"]["n"] for r in stub.requests] == [3, 2, 1]
    assert len({r["completion"] for r in read_jsonl(tmp_path / "o.jsonl")}) == 3


def test_openai_greedy_sends_temperature_zero(stub: StubServer, prompts_file: Path, tmp_path: Path) -> None:
    stub.api_key = None  # a local server without authentication
    teacher = OpenAITeacher("m", api_base=stub.api_base + "/")
    generate_dataset(prompts_file, tmp_path / "o.jsonl", teacher, GREEDY, limit=1, progress=None)
    assert stub.requests[0]["auth"] is None
    assert (stub.requests[0]["body"]["temperature"], stub.requests[0]["body"]["n"]) == (0.0, 1)


def test_openai_401_is_a_clear_error_without_retries(stub: StubServer, prompts_file: Path, tmp_path: Path) -> None:
    teacher = OpenAITeacher("m", api_base=stub.api_base, api_key="wrong", backoff_s=0.01)
    with pytest.raises(KdistillError, match=r"/v1/chat/completions answered HTTP 401 \(check the API key") as error:
        generate_dataset(prompts_file, tmp_path / "o.jsonl", teacher, GREEDY, progress=None)
    assert stub.api_base in str(error.value) and "Incorrect API key provided" in str(error.value)
    assert len(stub.requests) == 1


def test_openai_gives_up_after_three_retries(stub: StubServer, prompts_file: Path, tmp_path: Path) -> None:
    stub.failures = [429, 503, 503, 502, 500]
    teacher = OpenAITeacher("m", api_base=stub.api_base, api_key="sk-test", backoff_s=0.001)
    with pytest.raises(KdistillError, match=r"chat/completions failed after 4 attempts, last with HTTP 502"):
        generate_dataset(prompts_file, tmp_path / "o.jsonl", teacher, GREEDY, progress=None)
    assert len(stub.requests) == 4
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_openai_connection_refused(prompts_file: Path, tmp_path: Path) -> None:
    server = StubServer()  # bound to a free port, then closed: nothing listens there
    api_base = server.api_base
    server.server_close()
    teacher = OpenAITeacher("m", api_base=api_base, backoff_s=0.001)
    with pytest.raises(
        KdistillError, match=r"127\.0\.0\.1:\d+/v1/chat/completions failed after 4 attempts.*connection"
    ):
        generate_dataset(prompts_file, tmp_path / "o.jsonl", teacher, GREEDY, progress=None)


def test_cli_openai(stub: StubServer, prompts_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("STUB_KEY", "sk-test")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--backend", "openai", "--api-base", stub.api_base, "--api-key-env", "STUB_KEY",
            "--model", "stub-model", "--prompts", str(prompts_file), "--out", str(out), "--greedy"]  # fmt: skip
    assert run_cli(argv) == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == EXPECTED_IDS
    assert all(r["teacher"] == "stub-model" for r in records)
    meta = json.loads(meta_path(out).read_text())
    assert (meta["backend"], meta["model"], meta["api_base"]) == ("openai", "stub-model", stub.api_base)
    monkeypatch.delenv("STUB_KEY")
    assert run_cli([*argv, "--overwrite"]) == 2  # no key: the stub answers 401
    assert run_cli([*argv, "--gguf-file", "x.gguf"]) == 2


def test_each_batch_is_one_append_of_whole_lines(
    teacher_dir: Path, prompts_file: Path, tmp_path: Path, monkeypatch
) -> None:
    """Each batch reaches the file in one os.write of complete lines, followed by an fsync."""
    writes: list[bytes] = []
    syncs: list[int] = []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd) or real_fsync(fd))
    out = tmp_path / "out.jsonl"
    generate_dataset(prompts_file, out, HFTeacher(str(teacher_dir)), GREEDY, batch_size=4, progress=None)
    batch_writes = [w for w in writes if w.startswith(b'{"id"')]
    assert [w.count(b"\n") for w in batch_writes] == [4, 2]
    assert all(w.endswith(b"\n") for w in batch_writes)
    assert len(syncs) >= 2
    assert b"".join(batch_writes) == out.read_bytes()


def test_a_tokenizer_that_returns_token_type_ids_still_generates(teacher_dir: Path, prompts_file: Path, tmp_path):
    teacher = HFTeacher(str(teacher_dir))
    teacher._load()
    original = teacher._tokenizer.__class__.__call__

    def with_types(self, *args, **kwargs):  # a BERT-style tokenizer adds token_type_ids, which generate refuses
        encoded = original(self, *args, **kwargs)
        encoded["token_type_ids"] = encoded["input_ids"] * 0
        return encoded

    teacher._tokenizer.__class__ = type("TypedTokenizer", (teacher._tokenizer.__class__,), {"__call__": with_types})
    result = generate_dataset(prompts_file, tmp_path / "o.jsonl", teacher, GREEDY, limit=2, progress=None)
    assert result.lines_written == 2
