"""Feature taps against what the models themselves report (``output_hidden_states`` / ``output_attentions``).

References come from separate plain forward passes of the same (dropout-free, eval-mode) model, so a capture at the
wrong place, a copy, or a detached tensor makes a test fail.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import (
    make_batch,
    make_causal_batch,
    make_tiny_bert,
    make_tiny_llama,
    make_tiny_qwen,
)
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.features import (
    FeatureSource,
    FeatureSpecError,
    FeatureTap,
    extract_features,
    find_block_list,
    num_layers,
    resolve_feature,
)

MODEL_FACTORIES = {
    "bert": (make_tiny_bert, make_batch),
    "llama": (make_tiny_llama, make_causal_batch),
    "qwen": (make_tiny_qwen, make_causal_batch),
}


def _model_and_inputs(kind: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    make_model, make_inputs = MODEL_FACTORIES[kind]
    inputs = make_inputs()
    inputs.pop("labels")
    return make_model(), inputs


def _hook_counts(model: nn.Module) -> dict[str, tuple[int, int, int, int]]:
    return {
        name: (
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
            len(module._forward_hooks_with_kwargs),
            len(module._forward_pre_hooks_with_kwargs),
        )
        for name, module in model.named_modules()
    }


def _no_hooks(model: nn.Module) -> bool:
    return all(counts == (0, 0, 0, 0) for counts in _hook_counts(model).values())


# ---------------------------------------------------------------- hidden states and attention maps


@pytest.mark.parametrize("kind", ["bert", "llama", "qwen"])
def test_layer_specs_equal_the_models_own_hidden_states(kind):
    model, inputs = _model_and_inputs(kind)
    layers = num_layers(model)
    sources = {f"layer {n}": f"layer {n}" for n in range(layers + 1)}
    sources |= {"embeddings": "embeddings", "last": "last", "int": 2}
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True)
        _, features = extract_features(model, inputs, sources)
    assert len(reference.hidden_states) == layers + 1
    for n in range(layers + 1):
        assert torch.equal(features[f"layer {n}"], reference.hidden_states[n]), f"layer {n}"
    assert torch.equal(features["embeddings"], reference.hidden_states[0])
    assert torch.equal(features["last"], reference.hidden_states[layers])
    assert torch.equal(features["int"], reference.hidden_states[2])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_attention_layer_specs_equal_the_models_own_attentions(kind):
    model, inputs = _model_and_inputs(kind)
    layers = num_layers(model)
    sources = {f"att {n}": f"layer {n}" for n in range(1, layers + 1)} | {"att last": "last", "hidden 2": "layer 2"}
    kinds = {name: "attention" for name in sources if name.startswith("att")}
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True)
        with FeatureTap(model, sources, feature_kinds=kinds) as tap:
            assert tap.model_kwargs == {"output_attentions": True}
            outputs = model(**inputs, **tap.model_kwargs)
            features = tap.collect(outputs)
        hidden = model(**inputs, output_hidden_states=True).hidden_states[2]
    for n in range(1, layers + 1):
        assert features[f"att {n}"].shape == (4, 4, 12, 12)
        assert torch.equal(features[f"att {n}"], reference.attentions[n - 1]), f"attention {n}"
    assert torch.equal(features["att last"], reference.attentions[layers - 1])
    assert torch.equal(features["hidden 2"], hidden)


def test_hidden_features_need_no_extra_model_kwargs(tiny_bert_teacher, bert_batch):
    tap = FeatureTap(tiny_bert_teacher, {"h": "layer 3", "logits": "logits"})
    assert tap.model_kwargs == {}


def test_attention_on_an_sdpa_model_switches_to_eager_for_the_block_and_back():
    eager = make_tiny_bert(seed=3)
    sdpa = make_tiny_bert(seed=3, attn_implementation="sdpa")
    inputs = make_batch()
    inputs.pop("labels")
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).attentions
        _, features = extract_features(sdpa, inputs, {"att": "layer 3"}, feature_kinds="attention")
    assert torch.equal(features["att"], reference[2])
    assert sdpa.config._attn_implementation == "sdpa"


def test_an_attention_implementation_that_cannot_switch_gets_a_clear_error(tiny_bert_teacher, bert_batch):
    tiny_bert_teacher.set_attn_implementation("sdpa")
    tiny_bert_teacher.set_attn_implementation = lambda implementation: None  # a model that refuses to switch
    with (
        pytest.raises(FeatureSpecError, match="attn_implementation='eager'"),
        FeatureTap(tiny_bert_teacher, {"att": "layer 1"}, feature_kinds="attention"),
    ):
        pass
    assert _no_hooks(tiny_bert_teacher)


def test_collect_without_attentions_in_the_outputs_says_what_to_pass(tiny_bert_teacher, bert_batch):
    bert_batch.pop("labels")
    with FeatureTap(tiny_bert_teacher, {"att": "layer 2"}, feature_kinds="attention") as tap:
        outputs = tiny_bert_teacher(**bert_batch)  # model_kwargs forgotten
        with pytest.raises(FeatureSpecError, match="output_attentions"):
            tap.collect(outputs)


# ---------------------------------------------------------------- module paths


def test_module_paths_and_input_capture_on_bert(tiny_bert_teacher, bert_batch):
    model = tiny_bert_teacher
    bert_batch.pop("labels")
    sources = {
        "block 2": "bert.encoder.layer.1",
        "into block 3": "bert.encoder.layer.2:input",
        "pooled": "classifier:input",
        "classifier": "classifier",
        "logits": "logits",
    }
    with torch.no_grad():
        reference = model(**bert_batch, output_hidden_states=True)
        outputs, features = extract_features(model, bert_batch, sources)
        pooled = model.bert(**bert_batch).pooler_output
    assert torch.equal(features["block 2"], reference.hidden_states[2])
    assert torch.equal(features["into block 3"], reference.hidden_states[2])
    assert torch.equal(features["pooled"], pooled)
    assert torch.equal(features["classifier"], reference.logits)
    assert features["logits"] is outputs.logits


def test_last_is_the_final_normed_state_on_llama_and_the_raw_block_output_is_a_path(tiny_llama_teacher, llama_batch):
    model = tiny_llama_teacher
    llama_batch.pop("labels")
    sources = {"last": "last", "raw last block": "model.layers.3", "into lm_head": "lm_head:input"}
    with torch.no_grad():
        reference = model(**llama_batch, output_hidden_states=True)
        _, features = extract_features(model, llama_batch, sources)
        renormed = model.model.norm(features["raw last block"])
    assert torch.equal(features["last"], reference.hidden_states[4])
    assert torch.equal(features["into lm_head"], reference.hidden_states[4])
    assert torch.equal(renormed, reference.hidden_states[4])
    assert not torch.equal(features["raw last block"], reference.hidden_states[4])


def test_one_module_under_two_names_shares_the_same_tensor(tiny_bert_teacher, bert_batch):
    bert_batch.pop("labels")
    sources = {"a": "layer 2", "b": "bert.encoder.layer.1", "emb in": "layer 0", "emb out": "bert.embeddings"}
    _, features = extract_features(tiny_bert_teacher, bert_batch, sources)
    assert features["a"] is features["b"]
    assert (
        features["emb in"] is features["emb out"]
    )  # neither hooks copy: the input of block 1 is the embeddings' output


def test_input_capture_reads_the_hidden_states_keyword():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, *, hidden_states: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.linear(hidden_states) * scale

    class KeywordModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.layers:
                x = block(hidden_states=x, scale=0.5)
            return x

    model = KeywordModel()
    x = torch.randn(2, 3, 4)
    _, features = extract_features(model, {"x": x}, {"zero": "layer 0", "into 2": "layers.1:input", "one": "layer 1"})
    assert features["zero"] is x
    assert torch.equal(features["into 2"], model.layers[0](hidden_states=x, scale=0.5))
    assert features["into 2"] is features["one"]


# ---------------------------------------------------------------- gradients


def test_student_features_keep_their_graph(tiny_bert_student, bert_batch):
    student = tiny_bert_student.train()
    bert_batch.pop("labels")
    sources = {"emb": "embeddings", "h1": "layer 1", "att2": "layer 2", "pooled": "classifier:input"}
    _, features = extract_features(student, bert_batch, sources, feature_kinds={"att2": "attention"})
    assert all(feature.requires_grad for feature in features.values())
    (features["emb"].square().sum() + features["h1"].square().sum()).backward(retain_graph=True)
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert student.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
    assert student.bert.encoder.layer[1].output.dense.weight.grad is None  # after layer 1: not in the graph
    student.zero_grad()
    features["att2"].square().sum().backward()
    assert student.bert.encoder.layer[1].attention.self.query.weight.grad.abs().sum() > 0


def test_teacher_features_under_no_grad_have_no_graph(tiny_bert_teacher, bert_batch):
    bert_batch.pop("labels")
    with torch.no_grad():
        _, features = extract_features(tiny_bert_teacher, bert_batch, {"h": "layer 2", "logits": "logits"})
    assert not any(feature.requires_grad for feature in features.values())


# ---------------------------------------------------------------- hooks are removed


def test_no_hook_remains_after_the_block(tiny_llama_teacher, llama_batch):
    model = tiny_llama_teacher
    llama_batch.pop("labels")
    assert _no_hooks(model)
    sources = {"emb": "embeddings", "h2": "layer 2", "last": "last", "norm in": "model.norm:input"}
    with FeatureTap(model, sources) as tap:
        assert not _no_hooks(model)
        tap.collect(model(**llama_batch, **tap.model_kwargs))
    assert _no_hooks(model)
    assert set(tap.features) == set(sources)


def test_no_hook_remains_when_the_forward_raises(tiny_bert_teacher, bert_batch):
    model = tiny_bert_teacher
    bad_ids = bert_batch["input_ids"] + 1000  # outside the vocabulary: the embedding lookup raises
    with pytest.raises(IndexError), FeatureTap(model, {"h": "layer 1", "in": "bert.encoder.layer.2:input"}):
        model(input_ids=bad_ids)
    assert _no_hooks(model)


def test_attention_taps_leave_only_what_transformers_itself_installs(bert_batch):
    model = make_tiny_bert(attn_implementation="sdpa")
    bert_batch.pop("labels")
    with torch.no_grad():
        model.set_attn_implementation("eager")
        model(**bert_batch, output_attentions=True)  # transformers 5 installs its own recording hooks, for good
        model.set_attn_implementation("sdpa")
    before = _hook_counts(model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        FeatureTap(model, {"att": "layer 1", "h": "layer 1"}, feature_kinds={"att": "attention"}) as tap,
    ):
        assert model.config._attn_implementation == "eager"
        model(**bert_batch, **tap.model_kwargs)
        raise RuntimeError("boom")
    assert _hook_counts(model) == before
    assert model.config._attn_implementation == "sdpa"


def test_a_tap_cannot_be_entered_twice_at_once(tiny_bert_teacher):
    tap = FeatureTap(tiny_bert_teacher, {"h": "layer 1"})
    with tap, pytest.raises(FeatureSpecError, match="already active"), tap:
        pass
    assert _no_hooks(tiny_bert_teacher)


# ---------------------------------------------------------------- models without transformer blocks


def test_lstm_model_by_path_takes_the_first_element_of_the_tuple(tiny_lstm_student, bert_batch):
    model = tiny_lstm_student
    inputs = {"input_ids": bert_batch["input_ids"], "attention_mask": bert_batch["attention_mask"]}
    outputs, features = extract_features(
        model, inputs, {"states": "lstm", "pooled": "classifier:input", "logits": "logits"}
    )
    expected_states, _ = model.lstm(model.embedding(inputs["input_ids"]))
    assert features["states"].shape == (4, 12, 32)
    assert torch.equal(features["states"], expected_states)
    assert torch.equal(model.classifier(features["pooled"]), outputs.logits)
    assert features["logits"] is outputs.logits
    with pytest.raises(FeatureSpecError, match="module path"):
        resolve_feature(model, "layer 1")


def test_adaptor_features_are_merged_in(tiny_lstm_student, bert_batch):
    def adaptor(inputs, outputs):
        return {"probs": outputs.logits.softmax(-1), "lengths": inputs["attention_mask"].sum(-1)}

    _, features = extract_features(tiny_lstm_student, bert_batch, {"states": "lstm"}, adaptor=adaptor)
    assert set(features) == {"states", "probs", "lengths"}
    assert features["lengths"].tolist() == bert_batch["attention_mask"].sum(-1).tolist()
    with pytest.raises(FeatureSpecError, match="states"):
        extract_features(tiny_lstm_student, bert_batch, {"states": "lstm"}, adaptor=lambda i, o: {"states": o.logits})


def test_logits_without_a_logits_output_names_the_adaptor():
    model = make_tiny_bert(task="qa")
    inputs = make_batch()
    inputs.pop("labels")
    with pytest.raises(FeatureSpecError, match="adaptor"):
        extract_features(model, inputs, {"logits": "logits"})


# ---------------------------------------------------------------- block lists and bad specs


def test_find_block_list_on_known_models_and_the_fallback():
    assert find_block_list(make_tiny_bert(num_layers=3)) == ("bert.encoder.layer", 3)
    assert find_block_list(make_tiny_llama(num_layers=2)) == ("model.layers", 2)
    assert find_block_list(make_tiny_bert(task="token").bert) == ("encoder.layer", 4)

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Dropout()])
            self.stack = nn.ModuleList([nn.GRU(2, 2) for _ in range(3)])

    assert find_block_list(Odd()) == ("stack", 3)
    assert num_layers(Odd()) == 3


def test_layer_out_of_range_names_the_layer_and_the_models_count(tiny_bert_teacher):
    with pytest.raises(FeatureSpecError) as info:
        resolve_feature(tiny_bert_teacher, "layer 9")
    assert "layer 9" in str(info.value) and "4 layers" in str(info.value)
    assert isinstance(info.value, (InvalidArgumentError, KdistillError, ValueError))
    with pytest.raises(FeatureSpecError, match="4 layers"):
        resolve_feature(tiny_bert_teacher, "layer -1")
    with pytest.raises(FeatureSpecError, match="layer 0"):
        resolve_feature(tiny_bert_teacher, "layer 0", feature="attention")
    with pytest.raises(FeatureSpecError, match="attention"):
        resolve_feature(tiny_bert_teacher, "embeddings", feature="attention")


def test_typo_in_a_path_suggests_the_real_module(tiny_bert_teacher):
    with pytest.raises(FeatureSpecError) as info:
        resolve_feature(tiny_bert_teacher, "bert.encoder.layers.3")
    message = str(info.value)
    assert "'bert.encoder.layers.3'" in message and "did you mean 'bert.encoder.layer.3'" in message
    with pytest.raises(FeatureSpecError, match=r"children of the model: bert, dropout, classifier"):
        resolve_feature(tiny_bert_teacher, "qqq")


def test_other_bad_specs(tiny_bert_teacher):
    with pytest.raises(FeatureSpecError, match="module paths only"):
        resolve_feature(tiny_bert_teacher, "layer 2:input")
    with pytest.raises(FeatureSpecError, match="feature must be"):
        resolve_feature(tiny_bert_teacher, "layer 2", feature="hiddens")
    with pytest.raises(FeatureSpecError, match="non-empty"):
        resolve_feature(tiny_bert_teacher, "  ")
    with pytest.raises(FeatureSpecError, match="not among the sources"):
        FeatureTap(tiny_bert_teacher, {"h": "layer 1"}, feature_kinds={"g": "attention"})
    with pytest.raises(InvalidArgumentError, match="kind"):
        FeatureSource(kind="hidden")


def test_resolved_sources_say_where_they_capture(tiny_bert_teacher, tiny_llama_teacher):
    assert resolve_feature(tiny_bert_teacher, "Layer 0") == FeatureSource(
        kind="hook", path="bert.encoder.layer.0", capture="input", layer=0, spec="Layer 0"
    )
    assert resolve_feature(tiny_bert_teacher, "layer 2").path == "bert.encoder.layer.1"
    assert resolve_feature(tiny_llama_teacher, "last").path == "model"  # the base model's last_hidden_state
    assert resolve_feature(tiny_llama_teacher, "lm_head:input").capture == "input"
    assert resolve_feature(tiny_llama_teacher, "layer 3", feature="attention") == FeatureSource(
        kind="attention", layer=3, spec="layer 3"
    )
    source = FeatureSource(kind="hook", path="lm_head")
    assert resolve_feature(tiny_llama_teacher, source) is source


def test_module_that_does_not_run_is_reported(tiny_bert_teacher, bert_batch):
    bert_batch.pop("labels")
    with FeatureTap(tiny_bert_teacher, {"pooler": "bert.pooler"}) as tap:
        outputs = tiny_bert_teacher.bert.encoder(tiny_bert_teacher.bert.embeddings(bert_batch["input_ids"]))
        with pytest.raises(FeatureSpecError, match="did not run"):
            tap.collect(outputs)
