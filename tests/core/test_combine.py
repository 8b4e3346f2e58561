"""combine_adapters: weighted sums of deltas by concatenation, averaging or truncated SVD."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig, add_adapter
from lorakit.core.combine import combine_adapters
from lorakit.core.layers import LoraEmbedding
from lorakit.core.walk import lora_layers
from lorakit.formats.io import load_adapter, save_adapter
from tests.models import logits, randomize_adapters, tiny_llama, tokens


def three_adapters():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj", "embed_tokens"]), name="a")
    add_adapter(model, LoraConfig(r=4, alpha=4, targets=["q_proj", "o_proj"], use_rslora=True), name="b")
    add_adapter(model, LoraConfig(r=2, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"]), name="c")
    randomize_adapters(model)
    return model


def deltas(model, name):
    return {layer.path: layer.delta_weight(name).detach() for layer in lora_layers(model)
            if name in layer.lora_A}


def weighted_sum(model, weights):
    total = {}
    for name, weight in weights.items():
        for path, delta in deltas(model, name).items():
            total[path] = total.get(path, 0) + weight * delta
    return total


def assert_deltas_close(actual, expected, atol):
    assert set(actual) == set(expected)
    for path in expected:
        torch.testing.assert_close(actual[path], expected[path], rtol=0, atol=atol)


def test_cat_is_exactly_the_weighted_sum():
    model = three_adapters()
    weights = {"a": 0.7, "b": 0.3, "c": -0.5}
    error = combine_adapters(model, weights, name="abc", method="cat")
    assert error < 1e-6
    assert_deltas_close(deltas(model, "abc"), weighted_sum(model, weights), atol=1e-5)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A["abc"].out_features == 2 + 4 + 2 and q.scaling["abc"] == 1.0
    assert lorakit.active_adapters(model) == ["abc"]


def test_cat_output_equals_running_the_adapters_together_with_scaled_weights():
    model = three_adapters()
    combine_adapters(model, {"a": 1.0, "b": 1.0}, name="ab")
    ids = tokens()
    combined = logits(model, ids)
    lorakit.set_adapter(model, ["a", "b"])
    torch.testing.assert_close(combined, logits(model, ids), rtol=1e-5, atol=1e-5)


def test_svd_full_rank_reproduces_and_truncation_reports_its_error():
    model = three_adapters()
    weights = {"a": 0.7, "b": 0.3}
    target = weighted_sum(model, weights)
    assert combine_adapters(model, weights, name="full", method="svd", svd_rank=6) < 1e-5
    assert_deltas_close(deltas(model, "full"), target, atol=1e-5)

    error = combine_adapters(model, weights, name="low", method="svd", svd_rank=1)
    low = deltas(model, "low")
    actual = (sum(((low[p] - target[p]) ** 2).sum() for p in target)
              / sum((t ** 2).sum() for t in target.values()))
    assert 0.01 < error < 1 and error == pytest.approx(actual.sqrt().item(), rel=1e-3)
    assert model.model.layers[0].self_attn.q_proj.lora_A["low"].out_features == 1
    for path in target:  # each module's truncation is the best rank-1 approximation
        best = torch.linalg.svdvals(target[path])
        residual = torch.linalg.matrix_norm(low[path] - target[path])
        assert residual == pytest.approx(best[1:].pow(2).sum().sqrt().item(), rel=1e-3, abs=1e-6)


def test_linear_is_exact_for_a_shared_a_and_needs_equal_ranks():
    model = three_adapters()
    with torch.no_grad():  # give "c" the same A as "a": then averaging As and summing Bs is exact
        for layer in lora_layers(model):
            if isinstance(layer, LoraEmbedding):
                layer.lora_embedding_A["c"].copy_(layer.lora_embedding_A["a"])
            elif "a" in layer.lora_A:
                layer.a("c").weight.copy_(layer.a("a").weight)
    weights = {"a": 0.25, "c": 0.75}
    assert combine_adapters(model, weights, name="ac", method="linear") < 1e-6
    assert_deltas_close(deltas(model, "ac"), weighted_sum(model, weights), atol=1e-5)
    with pytest.raises(ValueError, match="'linear' needs adapters of the same rank.*'model.embed_tokens': "
                                         "'a': r=2, 'b': not adapted"):
        combine_adapters(model, {"a": 0.5, "b": 0.5}, name="ab", method="linear")


def test_combined_adapter_saves_and_loads(tmp_path):
    model = three_adapters()
    combine_adapters(model, {"a": 0.6, "b": 0.4}, name="ab")
    ids = tokens()
    expected = logits(model, ids)
    save_adapter(model, tmp_path, name="ab")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), expected)


def test_combine_errors_leave_the_model_alone():
    model = three_adapters()
    before = lorakit.list_adapters(model)
    cases = [
        (dict(weights={"a": 1, "zz": 1}, name="n"), "unknown adapter 'zz'; adapters on this model: a, b, c"),
        (dict(weights={}, name="n"), "at least one adapter"),
        (dict(weights={"a": 1}, name="b"), "'b' already exists"),
        (dict(weights={"a": 1}, name="n", method="ties"),
         "method must be one of cat, linear, svd, got 'ties'"),
        (dict(weights={"a": 1}, name="n", method="svd", svd_rank=0), "svd_rank must be an integer >= 1"),
        (dict(weights={"a": 1, "c": -1}, name="n", method="linear"), "sum to 0"),
        (dict(weights={"a": float("nan")}, name="n"), "finite"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            combine_adapters(model, **kwargs)
    assert lorakit.list_adapters(model) == before
