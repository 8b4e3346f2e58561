"""LoRA on a 4-bit NF4 base: trains, refuses in-place merges, merges by dequantizing."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig, add_adapter, merge_and_unload
from lorakit.core.layers import LoraLinear
from lorakit.kernels import paths
from lorakit.quant import NF4Linear, quantize_model
from tests.models import autograd_nodes, logits, randomize_adapters, tiny_gpt2, tiny_llama, tokens


def qlora_llama():
    model = quantize_model(tiny_llama(), "nf4")
    add_adapter(model, LoraConfig(r=4, alpha=8))
    return model


def test_adapter_wraps_nf4_layers_and_starts_identical():
    model = quantize_model(tiny_llama(), "nf4")
    ids = tokens()
    before = logits(model, ids)
    add_adapter(model, LoraConfig(r=4))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and layer.kind == "quantized" and isinstance(layer.base, NF4Linear)
    assert torch.equal(logits(model, ids), before)


def test_only_adapters_train_on_a_4bit_base():
    model = qlora_llama()
    model.train()
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    counted, total = lorakit.trainable_parameters(model)
    reference = tiny_llama()
    assert total == sum(p.numel() for p in reference.parameters()) + counted


def test_gpt2_conv1d_quantized_then_adapted_matches_dequantized_reference():
    model = quantize_model(tiny_gpt2(), "nf4")
    add_adapter(model, LoraConfig(r=2, targets=["c_attn"]))
    randomize_adapters(model)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 32)
    weight = layer.base.dequantize_weight(torch.float32)  # (out, in)
    expected = (x @ weight.T + layer.base.bias
                + layer.scaling["default"] * layer.b("default")(layer.a("default")(x)))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_in_place_merge_into_4bit_is_refused_with_the_way_out():
    model = qlora_llama()
    with pytest.raises(ValueError, match="merge_and_unload\\(model, quantized='dequantize'\\)"):
        lorakit.merge(model)
    with pytest.raises(ValueError, match="pass quantized='dequantize'"):
        merge_and_unload(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)  # untouched


@pytest.mark.parametrize("mode, tolerance", [("dequantize", 1e-5), ("requantize", 0.5)])
def test_merge_and_unload_of_4bit_base(mode, tolerance, capsys):
    model = qlora_llama()
    randomize_adapters(model)
    ids = tokens()
    unmerged = logits(model, ids)
    merge_and_unload(model, quantized=mode)
    printed = capsys.readouterr().out
    assert "max |logits difference| merged vs unmerged QLoRA model" in printed
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, torch.nn.Linear if mode == "dequantize" else NF4Linear)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    gap = (logits(model, ids) - unmerged).abs().max().item()
    assert gap < tolerance


def test_bad_quantized_mode():
    with pytest.raises(ValueError, match="quantized must be one of dequantize, requantize"):
        merge_and_unload(qlora_llama(), quantized="int8")


def test_quantize_model_copies_the_rest_out_of_loaded_storage_and_keeps_ties():
    model = tiny_llama(tie=True)
    embedding = model.model.embed_tokens.weight
    pointer = embedding.data_ptr()
    quantize_model(model, "nf4")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.model.embed_tokens.weight.data_ptr() != pointer  # our own copy, not the loaded storage
    assert torch.equal(model.model.embed_tokens.weight, embedding)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_4bit_llama_on_the_fused_paths_trains_as_on_the_plain_ones(dropout, monkeypatch):
    """NF4 layers take the fused LoRA linear, the grouped q/k/v and gate/up A sides and the fused
    SwiGLU with down's LoRA, W dequantized in forward and again in backward; values and gradients
    are those of the per-layer path (each NF4Linear, then LoraUpdateFunction)."""
    from lorakit import fuse_gated_mlps, group_attention_inputs

    def run(fused):
        model = quantize_model(tiny_llama(), "nf4")
        add_adapter(model, LoraConfig(r=4, alpha=8, dropout=dropout))
        randomize_adapters(model)
        fuse_gated_mlps(model)
        group_attention_inputs(model)
        model.train()
        if not fused:
            monkeypatch.setattr(paths, "fused_adapter", lambda layer, dtype, autocast: None)
        torch.manual_seed(0)
        loss = model(input_ids=tokens(), labels=tokens()).loss
        nodes = {type(node).__name__ for node in autograd_nodes(loss)}
        fused_nodes = {"SwiGLULoraFunctionBackward", "SharedASideFunctionBackward",
                       "LoraLinearFunctionBackward"}
        assert (fused_nodes <= nodes) if fused else not (fused_nodes & nodes)
        loss.backward()
        monkeypatch.undo()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (loss_fused, grads_fused), (loss_plain, grads_plain) = run(True), run(False)
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads_fused.keys() == grads_plain.keys() and len(grads_fused) > 0
    for name, grad in grads_fused.items():
        torch.testing.assert_close(grad, grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_4bit_layer_takes_the_fused_path_only_where_the_dtypes_allow():
    model = qlora_llama()
    layer = model.model.layers[0].self_attn.q_proj
    assert paths.path_for(layer, torch.float32, autocast=False) == "fused"
    assert paths.path_for(layer, torch.float32, autocast=True) != "fused"  # autocast: the per-layer paths
    assert paths.path_for(layer, torch.bfloat16, autocast=False) != "fused"  # x not in the compute dtype
