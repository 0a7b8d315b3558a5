"""causal_lm_loss_sums: the plain path against a float64 reference written here, the chunked path against plain.

The reference shifts and normalizes by hand (logits at t against labels at t + 1, log-softmax as x - logsumexp x),
so a wrong shift or a wrong count fails here rather than agreeing with itself. The chunked path must give the same
sums and the same student gradients (1e-5 relative, float32) for each divergence, with and without CE, for tiny Llama
and Qwen models, differing vocabularies, tied embeddings, LoRA students and scaled logits.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_causal_batch, make_tiny_llama, make_tiny_qwen
from kdistill.distillers.lm_heads import LMHead, final_hidden_states, lm_head_of
from kdistill.distillers.lm_loss import causal_lm_loss_sums
from kdistill.errors import InvalidArgumentError, VocabMismatchError

DIVERGENCE_CASES: list[tuple[str, dict[str, float]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.3}),
    ("skewed_forward_kl", {"skew": 0.2}),
    ("total_variation", {}),
]
FAMILIES = {"llama": make_tiny_llama, "qwen": make_tiny_qwen}


def _batch(vocab: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch 4 × 12 with right padding (rows 1, 3) and a prompt of 3 tokens masked in rows 0 and 2."""
    batch = make_causal_batch(batch=4, seq=12, vocab=vocab, seed=seed)
    batch["labels"][0, :3] = -100
    batch["labels"][2, :3] = -100
    return batch


def _pair(family: str, student_vocab: int = 128) -> tuple[nn.Module, nn.Module]:
    make = FAMILIES[family]
    teacher = make(num_layers=2, hidden=32, heads=4, kv_heads=2, seed=0)
    student = make(num_layers=2, hidden=16, heads=4, kv_heads=2, vocab=student_vocab, seed=1)
    return student, teacher


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _run(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], **kw: Any) -> tuple[Any, dict]:
    student.zero_grad(set_to_none=True)
    sums = causal_lm_loss_sums(student, teacher, batch, **kw)
    total = sum(t for t in (sums.kd_sum, sums.hard_sum) if t is not None)
    total.backward()
    return sums, _grads(student)


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to ``rel`` times the largest magnitude of ``expected`` (gradients have entries near zero)."""
    scale = expected.detach().abs().max().clamp_min(1e-12)
    err = (actual.detach() - expected.detach()).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3g} exceeds {rel} × {scale:.3g}"


def _assert_same_loss_and_grads(plain: tuple[Any, dict], chunked: tuple[Any, dict]) -> None:
    (plain_sums, plain_grads), (chunked_sums, chunked_grads) = plain, chunked
    assert chunked_sums.count == plain_sums.count
    assert chunked_sums.student_logits is None and plain_sums.student_logits is not None
    for name in ("kd_sum", "hard_sum"):
        expected, actual = getattr(plain_sums, name), getattr(chunked_sums, name)
        assert (expected is None) == (actual is None), name
        if expected is not None:
            _assert_rel(actual, expected)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        _assert_rel(chunked_grads[name], grad)


# ---------------------------------------------------------------- plain path against float64


def _reference(student: nn.Module, teacher: nn.Module, batch: dict, temperature: float) -> dict[str, Any]:
    """Forward KL, reverse KL and CE summed over counted positions, float64, shift and softmax by hand."""
    with torch.no_grad():
        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s_logits = student(**model_inputs).logits.double()[:, :-1]  # (B, T-1, V): position t predicts t + 1
        t_logits = teacher(**model_inputs).logits.double()[:, :-1]
    targets = batch["labels"][:, 1:]  # (B, T-1)
    counted = targets != -100

    def log_softmax(x: torch.Tensor) -> torch.Tensor:
        return x - torch.logsumexp(x, dim=-1, keepdim=True)

    log_ps, log_pt = log_softmax(s_logits / temperature), log_softmax(t_logits / temperature)
    forward = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B, T-1)
    reverse = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    log_ps1 = log_softmax(s_logits)
    nll = -log_ps1.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    return {
        "count": int(counted.sum()),
        "forward_kl": forward[counted].sum(),
        "reverse_kl": reverse[counted].sum(),
        "ce": nll[counted].sum(),
    }


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_plain_sums_equal_float64_reference(divergence: str) -> None:
    student, teacher = _pair("llama")
    batch = _batch()
    sums = causal_lm_loss_sums(
        student, teacher, batch, divergence=divergence, temperature=2.0, hard_weight=0.5, kd_weight=3.0
    )
    ref = _reference(student, teacher, batch, temperature=2.0)
    assert sums.count == ref["count"] == 9 + 8 + 9 + 2  # lengths 12, 9, 12, 3; prompts of 3 in rows 0 and 2
    torch.testing.assert_close(sums.kd_sum.double(), ref[divergence], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.hard_sum.double(), ref["ce"], rtol=1e-5, atol=1e-6)
    assert sums.student_logits is not None and sums.student_logits.requires_grad


def test_zero_weights_skip_their_terms_and_the_teacher() -> None:
    student, _ = _pair("llama")
    batch = _batch()
    only_ce = causal_lm_loss_sums(student, None, batch, kd_weight=0.0, hard_weight=1.0)
    assert only_ce.kd_sum is None and only_ce.hard_sum is not None
    only_ce_chunked = causal_lm_loss_sums(student, None, batch, kd_weight=0.0, hard_weight=1.0, chunked=True)
    _assert_rel(only_ce_chunked.hard_sum, only_ce.hard_sum)
    with pytest.raises(InvalidArgumentError, match="teacher is None"):
        causal_lm_loss_sums(student, None, batch)


def test_teacher_outputs_replace_the_teacher_forward() -> None:
    student, teacher = _pair("llama")
    batch = _batch()
    expected = causal_lm_loss_sums(student, teacher, batch, divergence="reverse_kl")
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = final_hidden_states(teacher, batch)
    from_logits = causal_lm_loss_sums(student, None, batch, divergence="reverse_kl", teacher_outputs=logits)
    _assert_rel(from_logits.kd_sum, expected.kd_sum)
    from_hidden = causal_lm_loss_sums(
        student, teacher, batch, divergence="reverse_kl", teacher_outputs=hidden, chunked=True
    )
    _assert_rel(from_hidden.kd_sum, expected.kd_sum)


def test_final_hidden_states_feed_the_lm_head() -> None:
    student, _ = _pair("qwen")
    batch = _batch()
    hidden = final_hidden_states(student, batch)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    _assert_rel(hidden @ lm_head_of(student).weight.T, logits)


# ---------------------------------------------------------------- chunked path against plain


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("hard_weight", [0.0, 1.0])
@pytest.mark.parametrize(("divergence", "kd_kwargs"), DIVERGENCE_CASES)
def test_chunked_equals_plain(family: str, hard_weight: float, divergence: str, kd_kwargs: dict) -> None:
    student, teacher = _pair(family)
    batch = _batch(seed=3)
    options = {
        "divergence": divergence,
        "kd_kwargs": kd_kwargs,
        "temperature": 1.5,
        "hard_weight": hard_weight,
    }
    plain = _run(student, teacher, batch, **options)
    chunked = _run(student, teacher, batch, chunked=True, chunk_size=7, **options)  # 32 rows: 5 chunks, last short
    _assert_same_loss_and_grads(plain, chunked)


@pytest.mark.parametrize("vocab_policy", ["truncate", "pad"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_differing_vocabularies_follow_the_policy(family: str, vocab_policy: str) -> None:
    student, teacher = _pair(family, student_vocab=120)
    batch = _batch(vocab=120)
    options = {"divergence": "forward_kl", "vocab_policy": vocab_policy, "hard_weight": 1.0}
    plain = _run(student, teacher, batch, **options)
    chunked = _run(student, teacher, batch, chunked=True, chunk_size=8, **options)
    _assert_same_loss_and_grads(plain, chunked)


@pytest.mark.parametrize("chunked", [False, True])
def test_vocab_error_names_both_sizes(chunked: bool) -> None:
    student, teacher = _pair("llama", student_vocab=120)
    with pytest.raises(VocabMismatchError, match=r"120.*128"):
        causal_lm_loss_sums(student, teacher, _batch(vocab=120), chunked=chunked)


def test_tied_embeddings() -> None:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(5)
    student = LlamaForCausalLM(config).eval()
    _, teacher = _pair("llama")
    head = lm_head_of(student)
    assert head.weight is student.model.embed_tokens.weight and head.bias is None and head.scale == 1.0
    options = {"divergence": "generalized_jsd", "kd_kwargs": {"beta": 0.5}, "hard_weight": 0.7}
    plain = _run(student, teacher, _batch(), **options)
    chunked = _run(student, teacher, _batch(), chunked=True, chunk_size=6, **options)
    _assert_same_loss_and_grads(plain, chunked)


def test_lora_student_uses_its_adapters_on_the_chunked_path() -> None:
    peft = pytest.importorskip("peft")
    student, teacher = _pair("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(student, config)
    plain = _run(lora, teacher, _batch(), hard_weight=1.0)
    chunked = _run(lora, teacher, _batch(), chunked=True, chunk_size=5, hard_weight=1.0)
    _assert_same_loss_and_grads(plain, chunked)
    assert all("lora_" in name for name in plain[1])  # only the adapters train
    with lora.disable_adapter():  # the adapters change the loss, so the chunked path did use them
        without = causal_lm_loss_sums(lora, teacher, _batch(), chunked=True)
    assert not torch.isclose(without.kd_sum, plain[0].kd_sum, rtol=1e-4)


def test_softcapping_is_refused_on_the_chunked_path_only() -> None:
    student, teacher = _pair("llama")
    student.config.final_logit_softcapping = 30.0
    with pytest.raises(InvalidArgumentError, match="final_logit_softcapping"):
        causal_lm_loss_sums(student, teacher, _batch(), chunked=True)
    causal_lm_loss_sums(student, teacher, _batch())  # the plain path uses the model's own (capped) logits


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_logit_scaling_is_folded_into_the_head(family: str) -> None:
    import transformers

    common = {
        "vocab_size": 128,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if family == "cohere":
        config, model_class, expected_scale = (
            transformers.CohereConfig(logit_scale=0.5, **common),
            transformers.CohereForCausalLM,
            0.5,
        )
    else:
        config, model_class, expected_scale = (
            transformers.GraniteConfig(logits_scaling=4.0, **common),
            transformers.GraniteForCausalLM,
            0.25,
        )
    torch.manual_seed(2)
    student = model_class(config).eval()
    assert isinstance(lm_head_of(student), LMHead) and lm_head_of(student).scale == expected_scale
    _, teacher = _pair("llama")
    plain = _run(student, teacher, _batch(), divergence="reverse_kl", hard_weight=1.0)
    chunked = _run(student, teacher, _batch(), divergence="reverse_kl", hard_weight=1.0, chunked=True, chunk_size=9)
    _assert_same_loss_and_grads(plain, chunked)


class _VocabRows(TorchDispatchMode):
    """Records the most rows of any operator output with a vocabulary dimension, LM-head weights aside."""

    def __init__(self, vocab: int, hidden_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.vocab, self.hidden_sizes, self.most_rows = vocab, hidden_sizes, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor) or self.vocab not in leaf.shape:
                continue
            is_weight = leaf.dim() == 2 and any(size in self.hidden_sizes for size in leaf.shape)
            if not is_weight:  # (V, H) weights, their transposes and gradients are not logits
                self.most_rows = max(self.most_rows, leaf.numel() // self.vocab)
        return out


def test_chunked_path_never_builds_the_logits() -> None:
    student, teacher = _pair("llama")
    batch = _batch()
    counter = _VocabRows(vocab=128, hidden_sizes=(16, 32))
    with counter:
        sums = causal_lm_loss_sums(student, teacher, batch, chunked=True, chunk_size=4, hard_weight=1.0)
        (sums.kd_sum + sums.hard_sum).backward()
    assert sums.count == 28
    # chunk buffers (4 × V) and the (B, 1, V) logits of logits_to_keep=1, never (n_counted, V) = 28 × V
    assert 0 < counter.most_rows <= 4
    plain = _VocabRows(vocab=128, hidden_sizes=(16, 32))
    with plain:  # the check can fail: the plain path does build (B · T, V) logits
        causal_lm_loss_sums(student, teacher, batch, hard_weight=1.0)
    assert plain.most_rows >= 48
