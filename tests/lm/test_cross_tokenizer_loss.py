"""Causal-LM distillation across tokenizers (kdistill.distillers.lm_cross through DistillationTrainer.compute_loss).

The student has the word-level chat tokenizer of conftest (128 ids, ChatML-like template); the teacher a BPE tokenizer
trained here on the same words (60 ids, pieces such as ``t ha n ks``) with another chat template. The KD terms are
checked against float64 references written from scratch: explicit position lists and sorting for ULD, and for the
alignment explicit group boundaries computed from the token strings (not from the offsets the code uses).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_chat_tokenizer, make_tiny_llama
from kdistill.data.sft import _encode_with_spans, render_sft
from kdistill.data.sft_collate import SFTCollator
from kdistill.integrations import DistillationArguments, DistillationTrainer

WORDS = ["hello", "hi", "good", "fine", "thanks", "yes", "no", "i", "like", "love", "you", "what", "how", "name"]
TEACHER_VOCAB = 60
TEACHER_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
RECORDS = [
    {"messages": [{"role": "user", "content": "hi how"}, {"role": "assistant", "content": "Thanks, hello you"}]},
    {"messages": [{"role": "user", "content": "what name"}, {"role": "assistant", "content": "i like thanks"}]},
    {"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": "fine"}]},
]


def make_bpe_chat_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer (60 ids, trained on WORDS: "thanks" is ``t ha n ks``) with its own chat template and
    specials ``<pad> <s> </s> <unk> <|user|> <|assistant|>`` (pad 0, bos 1, eos 2, as the tiny Llamas)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.BpeTrainer(
        vocab_size=TEACHER_VOCAB,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'"),
    )
    backend.train_from_iterator(WORDS * 3 + ["the", "there", "thing"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = TEACHER_TEMPLATE
    return tokenizer


def make_teacher(seed: int = 3) -> torch.nn.Module:
    model = make_tiny_llama(vocab=TEACHER_VOCAB, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked distributions: far from a fresh student's
    return model


def make_student(seed: int = 4) -> torch.nn.Module:
    return make_tiny_llama(num_layers=1, hidden=16, heads=4, kv_heads=2, seed=seed)


def cross_batch(records=RECORDS, offsets: bool = True) -> dict:
    examples = render_sft(
        records, make_tiny_chat_tokenizer(), teacher_tokenizer=make_bpe_chat_tokenizer(), offsets=offsets
    )
    return SFTCollator(pad_token_id=0, teacher_pad_token_id=0)(examples)


def trainer_for(tmp_path: Path, student, teacher, method: str, **options) -> DistillationTrainer:
    args = DistillationArguments(
        output_dir=str(tmp_path / "out"),
        cross_tokenizer=method,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **options,
    )
    return DistillationTrainer(model=student, teacher_model=teacher, args=args)


# ---------------------------------------------------------------- references (float64, written from scratch)


def uld_distance(student_row: torch.Tensor, teacher_row: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ_j |sort↓(p_S)_j − sort↓(p_T)_j|, the shorter vector padded with zeros."""
    p = sorted(torch.softmax(student_row.double() / temperature, -1).tolist(), reverse=True)
    q = sorted(torch.softmax(teacher_row.double() / temperature, -1).tolist(), reverse=True)
    size = max(len(p), len(q))
    p, q = p + [0.0] * (size - len(p)), q + [0.0] * (size - len(q))
    return torch.tensor(sum(abs(a - b) for a, b in zip(p, q, strict=True)), dtype=torch.float64)


def counted_positions(labels_row: torch.Tensor) -> list[int]:
    """Positions t whose next token t + 1 is learned."""
    return [t for t in range(labels_row.shape[0] - 1) if int(labels_row[t + 1]) != -100]


def reference_uld(student_logits, teacher_logits, batch, temperature) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for b in range(student_logits.shape[0]):
        student_positions = counted_positions(batch["labels"][b])
        teacher_positions = counted_positions(batch["teacher"]["labels"][b])
        for s, t in zip(student_positions, teacher_positions, strict=False):  # in order, up to the shorter count
            total += uld_distance(student_logits[b, s], teacher_logits[b, t], temperature)
    return total


# Boundaries are character counts of the whitespace-free completion (both tokenizers drop whitespace); the closing
# special tokens of both templates end at END.
END = 10**9


def reference_aligned(
    student_logits, teacher_logits, batch, temperature, read: str = "first"
) -> tuple[torch.Tensor, int, int]:
    """Σ over groups (spans between boundaries that both tokenizations share) of the ULD distance at the positions
    predicting the group's first token (``read="last"``: its last token); also the number of groups and of groups
    with several teacher tokens."""
    student_tok, teacher_tok = make_tiny_chat_tokenizer(), make_bpe_chat_tokenizer()
    total = torch.zeros((), dtype=torch.float64)
    groups = multi = 0
    for b in range(student_logits.shape[0]):
        sides = []
        for tok, inputs in ((student_tok, batch), (teacher_tok, batch["teacher"])):
            learned = [i for i, label in enumerate(inputs["labels"][b].tolist()) if label != -100]
            tokens = tok.convert_ids_to_tokens(inputs["input_ids"][b].tolist())
            ends, length = [], 0
            for i in learned:
                length = END if tokens[i].startswith("<") else length + len(tokens[i])
                ends.append(length)
            sides.append((learned, ends))
        common = sorted(set(sides[0][1]) & set(sides[1][1]))
        previous = -1
        for boundary in common:
            first = []
            for learned, ends in sides:
                members = [i for i, end in zip(learned, ends, strict=True) if previous < end <= boundary]
                first.append(members[0] if read == "first" else members[-1])
            teacher_members = [i for i, e in zip(*sides[1], strict=True) if previous < e <= boundary]
            multi += len(teacher_members) > 1
            previous = boundary
            groups += 1
            s, t = first[0] - 1, first[1] - 1  # the positions that predict the group's first token
            total += uld_distance(student_logits[b, s], teacher_logits[b, t], temperature)
    return total, groups, multi


# ---------------------------------------------------------------- tests


def test_completion_offsets_index_the_assistant_content_on_both_sides() -> None:
    record = RECORDS[0]
    content = record["messages"][1]["content"]
    (example,) = render_sft([record], make_tiny_chat_tokenizer(), teacher_tokenizer=make_bpe_chat_tokenizer(),
                            offsets=True)  # fmt: skip
    for tok, side in ((make_tiny_chat_tokenizer(), example), (make_bpe_chat_tokenizer(), example["teacher"])):
        tokens = tok.convert_ids_to_tokens(side["input_ids"])
        learned = [i for i, label in enumerate(side["labels"]) if label != -100]
        assert all(side["completion_offsets"][i] == [0, 0] for i in range(len(tokens)) if i not in learned)
        *words, end = learned
        assert [content[slice(*side["completion_offsets"][i])].lower() for i in words] == [tokens[i] for i in words]
        assert side["completion_offsets"][end] == [len(content), len(content) + 1]  # the end-of-turn character
    assert "completion_offsets" not in render_sft([record], make_tiny_chat_tokenizer())[0]  # only on request


def test_a_slow_tokenizer_measures_spans_by_decoding() -> None:
    fast = make_tiny_chat_tokenizer()

    class Slow:  # decoding only: what a tokenizer without offsets mapping offers
        is_fast = False

        def __call__(self, texts, **kwargs):
            return fast(texts, add_special_tokens=False)

        def decode(self, ids):
            return fast.decode(ids)

    ids, spans = _encode_with_spans(Slow(), ["hello you like"])
    _, fast_spans = _encode_with_spans(fast, ["hello you like"])
    assert ids[0] == fast(["hello you like"], add_special_tokens=False)["input_ids"][0]
    assert [end for _, end in spans[0]] == [end for _, end in fast_spans[0]] == [5, 9, 14]


def uld_pairs(batch) -> int:
    """The positions ULD pairs: per row, the shorter of the two sides' counted positions."""
    return sum(
        min(len(counted_positions(batch["labels"][b])), len(counted_positions(batch["teacher"]["labels"][b])))
        for b in range(batch["labels"].shape[0])
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_kd_term_equals_a_float64_reference(tmp_path: Path, temperature: float) -> None:
    """The KD sum over paired positions, divided by the paired positions of the whole optimizer step (both
    micro-batches, counted before any forward), × kd_weight · T²."""
    student, teacher = make_student().double(), make_teacher().double()
    batch, other = cross_batch(offsets=False), cross_batch(RECORDS[:2], offsets=False)
    assert batch["input_ids"].shape != batch["teacher"]["input_ids"].shape  # the tokenizations really differ
    # the teacher learns only the first two tokens of row 0's completion: it has fewer counted positions there than
    # the student, so the paired positions are fewer than the student's tokens (the test tells the units apart)
    teacher_labels = batch["teacher"]["labels"]
    learned = (teacher_labels[0] != -100).nonzero().squeeze(1)
    teacher_labels[0, learned[2:]] = -100
    trainer = trainer_for(tmp_path, student, teacher, "uld", temperature=temperature, kd_weight=0.5)
    student.train()
    batches, num_items = trainer.get_batch_samples(iter([batch, other]), 2, torch.device("cpu"))
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in (batch, other))
    assert int(num_items) == tokens
    step_pairs = uld_pairs(batch) + uld_pairs(other)
    assert step_pairs < tokens  # the teacher has fewer counted positions in some row: the two units differ
    loss = trainer.compute_loss(student, batches[0], num_items_in_batch=num_items)
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(**{k: batch["teacher"][k] for k in ("input_ids", "attention_mask")}).logits
    reference = reference_uld(s_logits, t_logits, batch, temperature)
    assert loss.requires_grad
    assert float(loss.detach()) == pytest.approx(0.5 * temperature**2 * float(reference) / step_pairs, rel=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_aligned_kd_term_equals_a_float64_reference_over_explicit_spans(tmp_path: Path, temperature: float) -> None:
    student, teacher = make_student().double(), make_teacher().double()
    batch = cross_batch()
    trainer = trainer_for(tmp_path, student, teacher, "align", temperature=temperature, t2_scaling=False)
    student.train()
    count = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.compute_loss(student, batch, num_items_in_batch=count)
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(**{k: batch["teacher"][k] for k in ("input_ids", "attention_mask")}).logits
    reference, groups, multi = reference_aligned(s_logits, t_logits, batch, temperature)
    assert groups == count and multi >= 3  # one group per student token here; "thanks", "hello", "you" are split
    assert float(loss.detach()) == pytest.approx(float(reference) / count, rel=1e-10)
    # reading each group where its last token is predicted gives another number: the test tells the two apart
    last, _, _ = reference_aligned(s_logits, t_logits, batch, temperature, read="last")
    assert float(last) / count != pytest.approx(float(loss.detach()), rel=1e-3)
