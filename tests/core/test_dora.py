"""DoRA: every path against the float64 formula (values and gradients), Linear, Conv1D and NF4 bases,
exact merge/unmerge, the norm once per step, and the refusals."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, add_adapter, merge, merge_and_unload, unmerge
from lorakit.core import dora
from lorakit.core.combine import combine_adapters
from lorakit.core.layers import LoraLinear
from lorakit.kernels import lora_function, paths
from lorakit.kernels.paths import AUTOGRAD, UPDATE
from lorakit.quant import quantize_model
from tests.models import logits, tiny_llama, tokens


def reference(layer, x, weight=None, masks=None):
    """The plain formula: W x + b + sum of the adapters' terms; a DoRA adapter adds
    (g - 1) W x + g s B A dropout(x) with g = m / ||W + s B A||_row (the norm detached)."""
    weight = layer.weight_rows() if weight is None else weight  # (out, in)
    bias = 0 if layer.base.bias is None else layer.base.bias
    base = x @ weight.T + bias
    out = base
    for name in layer.live_adapters():
        a, b = layer.factors(name)
        s = layer.scaling[name]
        x_in = x if masks is None else masks[name]
        update = s * (x_in @ a.T) @ b.T
        if layer.uses_dora(name):
            norm = (weight + s * b @ a).norm(dim=1).detach()
            g = layer.magnitude(name).weight / norm
            out = out + (g - 1) * (base - bias) + g * update
        else:
            out = out + update
    return out


def dora_linear(base=None, r=3, alpha=6.0, dropout=0.0):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 7).double() if base is None else base)
    layer.base.requires_grad_(False)
    layer.add("default", r, alpha / r, dropout, init="random", use_dora=True)
    layer.set_active(["default"])
    with torch.no_grad():
        layer.magnitude("default").weight.mul_(torch.linspace(0.5, 1.5, layer.out_features,
                                                              dtype=torch.float64))
    return layer


def assert_values_and_gradients(layer, x, expected_path, masks=None, tol=1e-12):
    assert paths.path_for(layer, x.dtype, False) == expected_path
    ours, theirs = layer(x), reference(layer, x, masks=masks)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    leaves = [x, *[p for n in layer.live_adapters() for p in layer.adapter_parameters(n)]]
    grad = torch.randn_like(ours)
    for got, want in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(theirs, leaves, grad),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", [UPDATE, AUTOGRAD])
def test_every_path_gives_the_float64_formulas_values_and_gradients(path, monkeypatch):
    layer = dora_linear()
    # DoRA is never the fused plain-LoRA function
    assert paths.path_for(layer, torch.float64, False) == UPDATE
    monkeypatch.setattr(paths, "path_for", lambda layer, dtype, autocast: path)  # force the path under test
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert_values_and_gradients(layer, x, path)


def test_the_fused_mlp_leaves_a_dora_down_proj_to_its_layer():
    from lorakit import fuse_gated_mlps

    model = trained_dora_model(LoraConfig(r=4, alpha=8, use_dora=True, targets=["down_proj"]))
    ids = tokens()
    expected = logits(model, ids)
    fuse_gated_mlps(model)
    assert paths.fused_adapter(model.model.layers[0].mlp.down_proj, torch.float32, False) is None
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-6)


def test_a_dora_adapter_beside_a_plain_one_rescales_only_the_base_as_in_peft():
    layer = dora_linear()
    layer.add("plain", 2, 0.5, init="random")
    layer.add("second", 2, 1.5, init="random", use_dora=True)
    layer.set_active(["plain", "default", "second"])
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert_values_and_gradients(layer, x, UPDATE)


def test_conv1d_base():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(7, 12).double()  # weight stored (in x out)
    layer = dora_linear(conv)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert_values_and_gradients(layer, x, UPDATE)
    torch.testing.assert_close(layer.weight_rows(), conv.weight.T, rtol=0, atol=0)


def test_dropout_reaches_the_update_term_only(monkeypatch):
    masks = []
    original = lora_function.draw_keep_mask
    monkeypatch.setattr(lora_function, "draw_keep_mask",
                        lambda x, p: masks.append(original(x, p)) or masks[-1])
    layer = dora_linear(dropout=0.5)
    layer.train()
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert len(masks) == 1
    dropped = x * masks[0] / 0.5
    torch.testing.assert_close(out, reference(layer, x, masks={"default": dropped}), rtol=1e-12, atol=1e-12)


def test_a_fresh_dora_adapter_changes_nothing_and_m_is_the_row_norm_of_w():
    model = tiny_llama()
    ids = tokens()
    expected = logits(model, ids)
    add_adapter(model, LoraConfig(r=4, alpha=8, use_dora=True))
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-6)
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.magnitude("default").weight, q.base.weight.norm(dim=1), rtol=1e-6, atol=0)
    trainable = {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}


def trained_dora_model(config=None):
    model = tiny_llama()
    add_adapter(model, config or LoraConfig(r=4, alpha=8, use_dora=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def test_merge_and_unmerge_are_exact():
    model = trained_dora_model()
    ids = tokens()
    expected = logits(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()
               if "base_layer" in n or ".base." in n}
    merge(model)
    merge(model)  # twice is once
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    unmerge(model)
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    plain = merge_and_unload(model)
    torch.testing.assert_close(logits(plain, ids), expected, rtol=0, atol=1e-5)


def test_dora_merged_after_another_adapter_is_refused_before_any_change():
    model = trained_dora_model()
    add_adapter(model, LoraConfig(r=2, targets=["q_proj"]), name="plain")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"adapter 'default' uses DoRA.*'plain' would be merged into "
                                         r"'model.layers.0.self_attn.q_proj' before it"):
        merge(model, ["plain", "default"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    merge(model, ["default", "plain"])  # the DoRA adapter first: fine


def test_qdora_norm_uses_the_dequantized_weight_and_keeps_no_full_precision_copy():
    model = tiny_llama()
    quantize_model(model)
    ids = tokens()
    expected = logits(model, ids)
    add_adapter(model, LoraConfig(r=4, alpha=8, use_dora=True))
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.b("default").weight.normal_(std=0.1)
        layer.magnitude("default").weight.mul_(1.3)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    dequantized = layer.base.dequantize_weight(torch.float32)
    torch.testing.assert_close(layer(x), reference(layer, x, weight=dequantized), rtol=1e-5, atol=1e-5)
    full = layer.in_features * layer.out_features
    kept = [*layer.parameters(), *layer.buffers(), layer.magnitude("default")._norm]
    assert not [t for t in kept if t.is_floating_point() and t.numel() >= full]
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    merged = merge_and_unload(model, quantized="dequantize")
    assert isinstance(merged.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=0, atol=1e-5)


def test_the_row_norm_is_computed_once_per_step_not_per_micro_batch(monkeypatch):
    model = add_adapter(tiny_llama(), LoraConfig(r=4, alpha=8, use_dora=True, targets=["q_proj", "v_proj"]))
    calls = []  # counted from here: the norms that start the magnitudes are not a step's
    original = dora.row_norm
    monkeypatch.setattr(dora, "row_norm", lambda *args: calls.append(1) or original(*args))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    layers = 4
    for step in range(2):
        for seed in range(3):  # three micro-batches, one step
            ids = tokens(seed=seed)
            model(input_ids=ids, labels=ids).loss.backward()
        assert len(calls) == layers * (step + 1)
        optimizer.step()
        optimizer.zero_grad()
    logits(model.eval(), tokens())
    assert len(calls) == layers * 3  # the step changed A, B: computed again, then reused in eval


def test_dora_training_learns():
    model = add_adapter(tiny_llama(), LoraConfig(r=4, alpha=8, use_dora=True))
    model.train()
    ids = tokens()
    magnitude = model.model.layers[0].self_attn.q_proj.magnitude("default").weight
    start = magnitude.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first
    assert (magnitude.detach() - start).abs().max() > 1e-3  # the magnitude trained, not only A and B


def test_dora_on_an_embedding_is_refused_before_any_change():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"DoRA \(use_dora\) works on linear layers .* not on the "
                                         r"embedding\(s\) model.embed_tokens"):
        add_adapter(model, LoraConfig(r=2, targets=["q_proj", "embed_tokens"], use_dora=True))
    assert lorakit.list_adapters(model) == []
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_combine_and_per_row_refuse_dora_adapters():
    model = trained_dora_model()
    add_adapter(model, LoraConfig(r=2), name="plain")
    with pytest.raises(ValueError, match=r"adapters \['default'\] use DoRA"):
        combine_adapters(model, {"default": 0.5, "plain": 0.5}, "mix")
    assert "mix" not in lorakit.list_adapters(model)
    with pytest.raises(ValueError, match=r"adapter\(s\) 'default' use DoRA, which per-row adapters "
                                         r"do not support"):
        with lorakit.adapters_per_row(model, ["default", "plain"]):
            model(input_ids=tokens())
    with lorakit.adapters_per_row(model, ["plain", None]):  # plain rows still work
        model(input_ids=tokens())


def test_the_setting_is_validated():
    with pytest.raises(ValueError, match="use_dora must be True or False, got 'yes'"):
        LoraConfig(use_dora="yes")


def test_inspect_names_dora_and_counts_the_magnitudes(tmp_path):
    from lorakit.formats.inspect_adapter import inspect_adapter
    from lorakit.formats.io import save_adapter

    model = add_adapter(tiny_llama(), LoraConfig(r=4, alpha=8, use_dora=True, targets=["q_proj"]))
    save_adapter(model, tmp_path)
    text = inspect_adapter(tmp_path).text
    assert "LORA + DoRA, r=4" in text and "DoRA         64 magnitude values" in text
    assert "parameters   576 trainable\n" in text  # 2 x (4 x 32 + 32 x 4) + 2 x 32
