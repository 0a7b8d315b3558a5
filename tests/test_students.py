"""Students cut from the teacher, shrunk, recurrent, or loaded; and the errors for bad choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

from conftest import make_batch, make_causal_batch, make_tiny_bert, make_tiny_llama, make_tiny_qwen
from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.errors import InvalidArgumentError, UnknownNameError
from kdistill.features import FeatureTap, resolve_feature
from kdistill.models.birnn import BiRNNClassifier, BiRNNConfig
from kdistill.models.students import build_student, from_teacher, shrink, uniform_layers


def _outputs(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _assert_blocks_copied(teacher: torch.nn.Module, student: torch.nn.Module, prefix: str, layers: list[int]) -> None:
    """Student block ``j`` equals teacher block ``layers[j]``; every other tensor equals the teacher's."""
    teacher_state = teacher.state_dict()
    for key, tensor in student.state_dict().items():
        source = key
        if key.startswith(prefix):
            block, _, rest = key[len(prefix) :].partition(".")
            source = f"{prefix}{layers[int(block)]}.{rest}"
        assert torch.equal(tensor, teacher_state[source]), key
    first = next(key for key in student.state_dict() if key.startswith(prefix + "0."))
    neighbour = first.replace(f"{prefix}0.", f"{prefix}{layers[0] + 1}.", 1)
    assert not torch.equal(student.state_dict()[first], teacher_state[neighbour])  # blocks are told apart


def test_from_teacher_bert_copies_the_chosen_blocks(tmp_path: Path) -> None:
    teacher = make_tiny_bert()
    student = from_teacher(teacher, [0, 3]).eval()
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert type(student) is type(teacher)
    _assert_blocks_copied(teacher, student, "bert.encoder.layer.", [0, 3])
    batch = make_batch()
    logits = _outputs(student, batch)
    assert logits.shape == (4, 3)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(_outputs(loaded, batch), logits)


def test_from_teacher_llama_copies_blocks_norm_and_lm_head(tmp_path: Path) -> None:
    teacher = make_tiny_llama()
    student = from_teacher(teacher, [1, 3]).eval()
    _assert_blocks_copied(teacher, student, "model.layers.", [1, 3])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    batch = make_causal_batch()
    logits = _outputs(student, batch)
    assert logits.shape == (4, 12, 128)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, LlamaForCausalLM) and loaded.config.num_hidden_layers == 2
    torch.testing.assert_close(_outputs(loaded, batch), logits)


def test_from_teacher_keeps_per_layer_config_lists(tmp_path: Path) -> None:
    teacher = make_tiny_qwen()
    teacher.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    student = from_teacher(teacher, [0, 1, 3])
    assert student.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    student.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.layer_types == student.config.layer_types


def test_from_teacher_rejects_bad_layers() -> None:
    teacher = make_tiny_bert()
    with pytest.raises(InvalidArgumentError, match=r"layers\[1\] = 4 is not a block .* has 4 layers, indexed 0\.\.3"):
        from_teacher(teacher, [0, 4])
    with pytest.raises(InvalidArgumentError, match=r"layers\[0\] = -1"):
        from_teacher(teacher, [-1])
    with pytest.raises(InvalidArgumentError, match="empty"):
        from_teacher(teacher, [])
    with pytest.raises(InvalidArgumentError, match="repeat"):
        from_teacher(teacher, [1, 1])
    assert uniform_layers(12, 6) == [1, 3, 5, 7, 9, 11] and uniform_layers(4, 1) == [3]


def test_shrink_sets_sizes_and_seeds() -> None:
    teacher = make_tiny_bert()
    student = shrink(teacher, num_layers=2, hidden_size=16, num_heads=2)
    config = student.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 16, 2)
    assert config.intermediate_size == 32  # scaled with the width: 64 * 16 / 32
    assert student.bert.embeddings.word_embeddings.weight.shape == (100, 16)
    assert student.classifier.weight.shape == (3, 16)
    assert _outputs(student.eval(), make_batch()).shape == (4, 3)
    same = shrink(teacher, num_layers=2, hidden_size=16, num_heads=2)
    other = shrink(teacher, num_layers=2, hidden_size=16, num_heads=2, seed=1)
    assert torch.equal(same.classifier.weight, student.classifier.weight)
    assert not torch.equal(other.classifier.weight, student.classifier.weight)

    llama = shrink(make_tiny_llama(), num_layers=1, hidden_size=24, num_heads=6, intermediate_size=40)
    assert (llama.config.num_key_value_heads, llama.config.head_dim, llama.config.intermediate_size) == (3, 4, 40)
    assert llama(input_ids=make_causal_batch()["input_ids"]).logits.shape == (4, 12, 128)
    assert shrink(make_tiny_bert().config, num_layers=1).config.num_hidden_layers == 1

    with pytest.raises(InvalidArgumentError, match="hidden_size 30 is not divisible by num_heads 4"):
        shrink(teacher, hidden_size=30)
    with pytest.raises(InvalidArgumentError, match="num_layers must be a positive integer, got 0"):
        shrink(teacher, num_layers=0)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_birnn_shapes_padding_and_round_trip(rnn: str, tmp_path: Path) -> None:
    batch = make_batch()
    torch.manual_seed(0)
    model = BiRNNClassifier(BiRNNConfig(vocab_size=100, num_labels=3, embedding_dim=8, hidden_size=6, rnn=rnn)).eval()
    output = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], output_hidden_states=True)
    assert output.logits.shape == (4, 3) and output.loss.isfinite()
    embeddings, states = output.hidden_states
    assert embeddings.shape == (4, 12, 8) and states.shape == (4, 12, 12)
    assert (states[1, 9:] == 0).all()  # row 1 has 9 real tokens

    # padding never reaches either direction: a row alone gives the same logits as inside the padded batch
    alone = model(batch["input_ids"][1:2, :9]).logits
    torch.testing.assert_close(alone, output.logits[1:2])
    with pytest.raises(InvalidArgumentError, match="right-padded"):
        model(batch["input_ids"], batch["attention_mask"].flip(1))

    source = resolve_feature(model, "rnn")
    with FeatureTap(model, {"rnn": source}) as tap:
        model(batch["input_ids"], batch["attention_mask"])
    assert tap.features["rnn"].shape == (4, 12, 12)

    model.save_pretrained(tmp_path)
    loaded = BiRNNClassifier.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.config.to_dict()["model_type"] == "kdistill-birnn"
    torch.testing.assert_close(loaded(batch["input_ids"], batch["attention_mask"]).logits, output.logits)


def test_birnn_token_task_and_max_pooling() -> None:
    batch = make_batch()
    config = BiRNNConfig(vocab_size=100, num_labels=5, embedding_dim=8, hidden_size=4, task="token", num_layers=2)
    output = BiRNNClassifier(config).eval()(batch["input_ids"], batch["attention_mask"])
    assert output.logits.shape == (4, 12, 5)
    pooled = BiRNNClassifier(BiRNNConfig(vocab_size=100, num_labels=2, embedding_dim=8, hidden_size=4, pooling="max"))
    assert pooled.eval()(batch["input_ids"], batch["attention_mask"]).logits.shape == (4, 2)
    with pytest.raises(InvalidArgumentError, match=r"BiRNNConfig\.rnn must be one of"):
        BiRNNConfig(vocab_size=100, num_labels=2, rnn="transformer")
    with pytest.raises(InvalidArgumentError, match=r"BiRNNConfig\.hidden_size must be a positive integer"):
        BiRNNConfig(vocab_size=100, num_labels=2, hidden_size=0)


def test_build_student_dispatches_every_kind(tmp_path: Path) -> None:
    teacher = make_tiny_bert()
    assert build_student("from_teacher", teacher, num_layers=2).config.num_hidden_layers == 2
    assert build_student("shrink", teacher, hidden_size=16, num_heads=2).config.hidden_size == 16

    lstm = build_student("bilstm", teacher, hidden_size=8)
    assert isinstance(lstm.rnn.module, torch.nn.LSTM) and lstm.config.num_labels == 3
    assert torch.equal(lstm.embedding.weight, teacher.get_input_embeddings().weight)  # same vocab and width
    narrow = build_student("bigru", teacher, embedding_dim=8, hidden_size=8, task="token", num_labels=5)
    assert isinstance(narrow.rnn.module, torch.nn.GRU) and narrow.embedding.weight.shape == (100, 8)
    words = WordTokenizer.build(["one two three", "two three"])
    own_vocab = build_student("bilstm", teacher, vocab=words, embedding_dim=8, hidden_size=8)
    assert own_vocab.embedding.weight.shape == (words.vocab_size, 8)

    lstm.save_pretrained(tmp_path / "lstm")
    assert isinstance(build_student("pretrained", None, path=tmp_path / "lstm"), BiRNNClassifier)
    teacher.save_pretrained(tmp_path / "bert")
    loaded = build_student("pretrained", None, path=tmp_path / "bert", task="sequence")
    assert torch.equal(loaded.classifier.weight, teacher.classifier.weight)

    with pytest.raises(UnknownNameError, match="unknown student kind 'lstm'; known kinds: from_teacher, shrink"):
        build_student("lstm", teacher)
    with pytest.raises(InvalidArgumentError, match="rnn='gru' contradicts student kind 'bilstm'"):
        build_student("bilstm", teacher, rnn="gru")
    with pytest.raises(InvalidArgumentError, match="needs layers"):
        build_student("from_teacher", teacher)
    with pytest.raises(InvalidArgumentError, match="needs path"):
        build_student("pretrained", None)
    with pytest.raises(UnknownNameError, match="unknown task 'ner'"):
        build_student("pretrained", None, path=tmp_path / "bert", task="ner")
