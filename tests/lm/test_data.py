"""SFT data for causal-LM distillation: collation, rendering with masked prompts, packing, packaged dialogs, files.

Every expectation is computed independently in the test (by hand-built tensors, by rendering the chat template
directly, or by tokenizing the pieces one at a time), so a wrong mask, shift or padding side fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_chat_tokenizer, make_tiny_llama
from kdistill.data import sft_records as lm_data
from kdistill.data.loading import DataError
from kdistill.data.packaged import MissingPackageError
from kdistill.data.sft import pack_texts, render_sft
from kdistill.data.sft_collate import SFTCollator
from kdistill.data.sft_records import chatterbot_dialogs, load_sft_records
from kdistill.errors import InvalidArgumentError, KdistillError, UnknownNameError

ALPACA = {"instruction": "say hello", "input": "to me", "output": "Hello you"}
CHAT = {
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thanks"},
    ]
}


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _learned(example: dict) -> list[int]:
    return [t for t in example["labels"] if t != -100]


# ---------------------------------------------------------------------------------------------------------------
# SFTCollator
# ---------------------------------------------------------------------------------------------------------------


def test_collator_pads_right_prompts_left_and_passes_extra_keys() -> None:
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_length": 1, "example_id": 3},
        {
            "input_ids": torch.tensor([8, 9, 10, 11, 12]),
            "attention_mask": torch.tensor([1, 1, 1, 1, 1]),
            "labels": torch.tensor([-100, -100, 10, 11, 12]),
            "prompt_length": 2,
            "example_id": 7,
        },
    ]
    pad, multiple = 99, 4
    batch = SFTCollator(pad_token_id=pad, pad_to_multiple_of=multiple, with_prompts=True)(examples)

    width = -(-5 // multiple) * multiple  # the longest row (5) rounded up to a multiple of 4
    rows = [[5, 6, 7], [8, 9, 10, 11, 12]]
    labels = [[-100, 6, 7], [-100, -100, 10, 11, 12]]
    expected_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    expected_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    expected_labels = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    prompts = [r[:n] for r, n in zip(rows, (1, 2), strict=True)]
    prompt_width = -(-2 // multiple) * multiple
    expected_prompts = torch.tensor([[pad] * (prompt_width - len(p)) + p for p in prompts])
    expected_prompt_mask = torch.tensor([[0] * (prompt_width - len(p)) + [1] * len(p) for p in prompts])

    assert torch.equal(batch["input_ids"], expected_ids)
    assert torch.equal(batch["attention_mask"], expected_mask)
    assert torch.equal(batch["labels"], expected_labels)
    assert torch.equal(batch["prompt_input_ids"], expected_prompts)
    assert torch.equal(batch["prompt_attention_mask"], expected_prompt_mask)
    assert torch.equal(batch["example_id"], torch.tensor([3, 7]))
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "labels", "example_id"))
    # without pad_to_multiple_of the width is exactly the longest row
    assert SFTCollator(pad_token_id=0)(examples)["input_ids"].shape == (2, 5)


def test_collator_collates_the_teacher_tokenization_on_its_own() -> None:
    examples = [
        {"input_ids": [5, 6], "labels": [-100, 6], "teacher": {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}},
        {"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "teacher": {"input_ids": [5], "labels": [5]}},
    ]
    batch = SFTCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (2, 3)
    assert torch.equal(batch["teacher"]["input_ids"], torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0]]))
    assert torch.equal(batch["teacher"]["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]))
    assert torch.equal(batch["teacher"]["labels"], torch.tensor([[-100, 2, 3, 4], [5, -100, -100, -100]]))


@pytest.mark.parametrize(
    ("examples", "needle"),
    [
        ([{"input_ids": [1]}, {"labels": [1]}], "example 1 has no 'input_ids'"),
        ([{"input_ids": [1, 2], "labels": [1]}], "example 0: 'labels' has 1 entries but 'input_ids' has 2"),
        ([{"input_ids": [1], "teacher": {"input_ids": [1]}}, {"input_ids": [2]}], "example 1 has no 'teacher'"),
        ([{"input_ids": [1], "teacher": {"labels": [1]}}], "teacher example 0 has no 'input_ids'"),
        ([], "empty"),
    ],
)
def test_collator_errors_name_the_example(examples: list, needle: str) -> None:
    with pytest.raises(InvalidArgumentError, match=needle):
        SFTCollator(pad_token_id=0)(examples)


def test_collator_with_prompts_needs_prompt_length() -> None:
    with pytest.raises(InvalidArgumentError, match="example 0 needs an int 'prompt_length'"):
        SFTCollator(pad_token_id=0, with_prompts=True)([{"input_ids": [1, 2]}])


# ---------------------------------------------------------------------------------------------------------------
# render_sft
# ---------------------------------------------------------------------------------------------------------------


def test_render_masks_exactly_the_prompt() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    (example,) = render_sft([ALPACA], tokenizer)
    prompt = [{"role": "user", "content": f"{ALPACA['instruction']}\n\n{ALPACA['input']}"}]
    prompt_ids = _ids(tokenizer, tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    completion_ids = [*_ids(tokenizer, ALPACA["output"]), tokenizer.eos_token_id]

    assert example["input_ids"] == prompt_ids + completion_ids
    assert example["prompt_length"] == len(prompt_ids)
    assert example["labels"] == [-100] * len(prompt_ids) + completion_ids
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert example["example_id"] == 0
    learned = _learned(example)
    assert learned[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(learned, skip_special_tokens=True) == ALPACA["output"].lower()  # the tokenizer lowercases
    # the whole example is what the chat template renders for the full conversation (no EOS added twice)
    full = [*prompt, {"role": "assistant", "content": ALPACA["output"]}]
    assert example["input_ids"] == _ids(tokenizer, tokenizer.apply_chat_template(full, tokenize=False))


def test_render_without_mask_learns_everything_and_prompt_completion_records() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    record = {"prompt": "what is your name", "completion": "no name"}
    (masked,) = render_sft([record], tokenizer)
    (unmasked,) = render_sft([record], tokenizer, mask_prompt=False)
    assert unmasked["input_ids"] == masked["input_ids"] == unmasked["labels"]
    assert unmasked["prompt_length"] == masked["prompt_length"]
    assert _learned(masked) == masked["input_ids"][masked["prompt_length"] :]


def test_render_plain_format_without_chat_template() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    tokenizer.chat_template = None
    (example,) = render_sft([ALPACA], tokenizer, system_prompt="be good")
    # documented plain format: system "\n\n", prompt "\n", completion, EOS (this tokenizer adds no BOS)
    prompt_ids = _ids(tokenizer, "be good\n\n") + _ids(tokenizer, f"{ALPACA['instruction']}\n\n{ALPACA['input']}\n")
    completion_ids = [*_ids(tokenizer, ALPACA["output"]), tokenizer.eos_token_id]
    assert example["input_ids"] == prompt_ids + completion_ids
    assert example["labels"] == [-100] * len(prompt_ids) + completion_ids
    assert example["prompt_length"] == len(prompt_ids)


def test_render_chat_learns_both_assistant_turns_and_masks_the_users() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    (example,) = render_sft([CHAT], tokenizer, system_prompt="be nice")
    messages = [{"role": "system", "content": "be nice"}, *CHAT["messages"]]
    assert example["input_ids"] == _ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    eos = tokenizer.eos_token_id
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert _learned(example) == [*_ids(tokenizer, replies[0]), eos, *_ids(tokenizer, replies[1]), eos]
    # the learned positions are exactly the two replies, each right after its "<|im_start|>assistant" header
    header = _ids(tokenizer, "<|im_start|>assistant ")
    ids, labels = example["input_ids"], example["labels"]
    starts = [i + len(header) for i in range(len(ids)) if ids[i : i + len(header)] == header]
    expected = [-100] * len(ids)
    for start, reply in zip(starts, replies, strict=True):
        span = [*_ids(tokenizer, reply), eos]
        expected[start : start + len(span)] = span
    assert labels == expected
    assert example["prompt_length"] == starts[0]
    user_words = {t for m in messages if m["role"] != "assistant" for t in _ids(tokenizer, m["content"])}
    assert not user_words & set(_learned(example))


def test_eos_is_appended_to_the_last_turn_when_the_template_does_not_end_with_it() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    tokenizer.chat_template = (  # turns without an end marker: only the example's end gets EOS
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    (example,) = render_sft([CHAT], tokenizer)
    rendered = _ids(tokenizer, tokenizer.apply_chat_template(CHAT["messages"], tokenize=False))
    eos = tokenizer.eos_token_id
    assert eos not in rendered
    assert example["input_ids"] == [*rendered, eos]
    assert _learned(example) == [*_ids(tokenizer, "hello"), *_ids(tokenizer, "fine thanks"), eos]
    (no_eos,) = render_sft([CHAT], tokenizer, add_eos=False)
    assert no_eos["input_ids"] == rendered


def test_collated_prompts_are_the_generation_prompts() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    records = [ALPACA, {"prompt": "hi", "completion": "hello"}]
    batch = SFTCollator(pad_token_id=tokenizer.pad_token_id, with_prompts=True)(render_sft(records, tokenizer))
    for row, prompt in enumerate([f"{ALPACA['instruction']}\n\n{ALPACA['input']}", "hi"]):
        messages = [{"role": "user", "content": prompt}]
        expected = _ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        kept = batch["prompt_attention_mask"][row].bool()
        assert batch["prompt_input_ids"][row][kept].tolist() == expected
        assert kept[-len(expected) :].all()  # left-padded: the prompt ends in the last column


def test_truncation_keeps_the_prompt_and_reports_dropped_records() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    short = {"prompt": "hi", "completion": "hello how are you today"}
    long = {"prompt": " ".join(["hello"] * 30), "completion": "yes"}
    (full,) = render_sft([short], tokenizer)
    max_length = full["prompt_length"] + 2
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 records .*max_length=" + str(max_length)):
        examples = render_sft([short, long], tokenizer, max_length=max_length)
    assert examples.dropped == 1
    assert examples.dropped_ids == [1]
    (example,) = examples
    assert example["example_id"] == 0
    assert example["input_ids"] == full["input_ids"][:max_length]  # the prompt's start kept, the completion cut
    assert example["prompt_length"] == full["prompt_length"]
    assert _learned(example) == full["input_ids"][full["prompt_length"] : max_length]
    with pytest.raises(InvalidArgumentError, match="max_length=4"):
        render_sft([long], tokenizer, max_length=4)


def test_teacher_tokenization_is_added_when_the_teacher_tokenizes_differently() -> None:
    student = make_tiny_chat_tokenizer()
    teacher = make_tiny_chat_tokenizer(vocab=100)  # drops the last words: "help" becomes <unk> for the teacher
    assert student.get_vocab() != teacher.get_vocab()
    record = {"prompt": "can you help", "completion": "yes i can help"}
    (example,) = render_sft([record], student, teacher_tokenizer=teacher)
    (own,) = render_sft([record], teacher)  # the teacher's rendering computed on its own
    assert example["teacher"] == {k: own[k] for k in ("input_ids", "attention_mask", "labels", "prompt_length")}
    assert example["teacher"]["input_ids"] != example["input_ids"]
    assert teacher.unk_token_id in example["teacher"]["input_ids"]
    assert "teacher" not in render_sft([record], student, teacher_tokenizer=make_tiny_chat_tokenizer())[0]
    batch = SFTCollator(pad_token_id=student.pad_token_id)([example, example])
    assert torch.equal(batch["teacher"]["input_ids"][0], torch.tensor(own["input_ids"]))


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"instruction": "x"}, "record 1 has no 'output'"),
        ({"output": "x"}, "record 1 has no 'instruction'"),
        ({"instruction": "x", "output": 3}, "record 1: 'output' must be a string"),
        ({"prompt": "x"}, "record 1 has no 'completion'"),
        ({"text": "x"}, "record 1 has none of 'messages'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "record 1: 'messages' has no 'assistant'"),
        ({"messages": [{"role": "user", "content": None}]}, r"record 1: 'messages\[0\].content' must be a string"),
        ({"messages": [{"content": "x"}]}, "record 1: message 0 has no 'role'"),
        ("just text", "record 1 must be a dict"),
    ],
)
def test_bad_records_raise_naming_the_index(record: object, needle: str) -> None:
    with pytest.raises(InvalidArgumentError, match=needle):
        render_sft([ALPACA, record], make_tiny_chat_tokenizer())


def test_collated_sft_batch_gives_hf_loss_equal_to_a_shifted_float64_reference() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    examples = render_sft([ALPACA, CHAT, {"prompt": "hi", "completion": "hello"}], tokenizer)
    batch = SFTCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    model = make_tiny_llama()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        output = model(**inputs)
    # reference: the logits at t predict the label at t + 1; -100 (prompt, padding) is not counted
    logits = output.logits[:, :-1].double()
    targets = batch["labels"][:, 1:]
    counted = targets != -100
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs[counted].gather(-1, targets[counted].unsqueeze(-1)).squeeze(-1)
    reference = -picked.mean()
    assert counted.sum() == sum(len(_learned(e)) for e in examples)  # position 0 is never learned
    torch.testing.assert_close(output.loss.double(), reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# pack_texts
# ---------------------------------------------------------------------------------------------------------------


def test_pack_texts_blocks_are_exact_and_cover_the_stream_in_order() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    texts = ["hello how are you", "", "i am fine thanks", "what is your name", "my name is a"]
    stream = []
    for text in texts:
        ids = _ids(tokenizer, text)
        if ids:  # empty documents add nothing
            stream += [*ids, tokenizer.eos_token_id]
    block = 5
    blocks = pack_texts(texts, tokenizer, block_size=block)
    assert len(blocks) == len(stream) // block
    assert [t for b in blocks for t in b["input_ids"]] == stream[: len(blocks) * block]
    for number, b in enumerate(blocks):
        assert len(b["input_ids"]) == block
        assert b["labels"] == b["input_ids"]
        assert b["attention_mask"] == [1] * block
        assert b["prompt_length"] == 0
        assert b["example_id"] == number
    with pytest.raises(InvalidArgumentError, match=rf"block_size={len(stream) + 1}.* {len(stream)} tokens"):
        pack_texts(texts, tokenizer, block_size=len(stream) + 1)


# ---------------------------------------------------------------------------------------------------------------
# chatterbot_dialogs, load_sft_records
# ---------------------------------------------------------------------------------------------------------------


def test_chatterbot_dialogs_are_well_formed_and_deterministic() -> None:
    records = chatterbot_dialogs()
    assert len(records) > 1000
    for record in records:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in record["messages"])
        assert isinstance(record["category"], str)
    categories = [r["category"] for r in records]
    assert categories == sorted(categories)  # files are read in sorted order
    greetings = chatterbot_dialogs(["greetings"])
    assert greetings == [r for r in records if r["category"] == "greetings"]
    examples = render_sft(records[:50], make_tiny_chat_tokenizer(), max_length=64)
    assert len(examples) + examples.dropped == 50
    with pytest.raises(UnknownNameError, match="greetings"):
        chatterbot_dialogs(["no-such-category"])


def test_chatterbot_dialogs_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = lm_data.importlib.util.find_spec
    monkeypatch.setattr(
        lm_data.importlib.util, "find_spec", lambda name, *a: None if name == "chatterbot_corpus" else real(name, *a)
    )
    with pytest.raises(MissingPackageError, match="pip install --no-deps chatterbot-corpus"):
        chatterbot_dialogs()
    assert issubclass(MissingPackageError, KdistillError)


def test_load_sft_records_reads_jsonl_and_json_and_names_bad_lines(tmp_path: Path) -> None:
    records = [ALPACA, CHAT]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    array = tmp_path / "train.json"
    array.write_text(json.dumps(records), encoding="utf-8")
    assert load_sft_records(jsonl) == records
    assert load_sft_records(array) == records
    jsonl.write_text(json.dumps(ALPACA) + "\n" + json.dumps(CHAT) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        load_sft_records(jsonl)
    jsonl.write_text(json.dumps(ALPACA) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2 must be a JSON object"):
        load_sft_records(jsonl)
    with pytest.raises(DataError, match="not found"):
        load_sft_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"unsupported extension '\.csv'"):
        (tmp_path / "x.csv").write_text("a", encoding="utf-8")
        load_sft_records(tmp_path / "x.csv")
