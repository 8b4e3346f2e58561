"""fuse_rms_norms: transformers' RMSNorms run through RMSNormFunction; same outputs, same training."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, add_adapter, fuse_gated_mlps, fuse_rms_norms, group_attention_inputs
from lorakit.core.rebuild import rebuilds_outputs
from lorakit.hf.fused_norms import FusedRMSNorm
from tests.models import autograd_nodes, logits, loss_and_grads, randomize_adapters, tiny_llama, tokens


def lora_llama() -> nn.Module:
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4))
    randomize_adapters(model)
    return model.train()


def test_every_llama_norm_is_fused_with_the_same_outputs_and_keys():
    model = tiny_llama()
    ids, keys = tokens(), set(model.state_dict())
    expected = logits(model, ids)
    assert fuse_rms_norms(model) == 2 * 2 + 1  # two per layer and the final norm
    assert fuse_rms_norms(model) == 0  # already done
    assert set(model.state_dict()) == keys
    assert isinstance(model.model.norm, FusedRMSNorm) and "LlamaRMSNorm" in repr(model.model.norm)
    assert torch.equal(logits(model, ids), expected)
    assert lorakit.fuse_rms_norms is fuse_rms_norms


@pytest.mark.parametrize("grouped", [False, True])
def test_a_lora_llama_trains_like_the_unfused_one(grouped):
    results = []
    for fuse in (False, True):
        model = lora_llama()
        if fuse:
            fuse_rms_norms(model)
        if grouped:  # lorakit.train's order: norms, then the MLPs and q/k/v (which mark norms for rebuilding)
            fuse_gated_mlps(model)
            group_attention_inputs(model)
        results.append(loss_and_grads(model, tokens()))
    (loss, grads), (fused_loss, fused_grads) = results
    assert torch.equal(fused_loss, loss)
    assert grads.keys() == fused_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_norms_graph_holds_the_fused_function():
    model = lora_llama()
    fuse_rms_norms(model)
    names = {type(node).__name__ for node in autograd_nodes(model(input_ids=tokens()).logits)}
    assert "RMSNormFunctionBackward" in names and "RsqrtBackward0" not in names


def test_a_norm_marked_for_rebuilding_stays_marked():
    model = lora_llama()
    group_attention_inputs(model)  # marks each layer's input norm
    assert rebuilds_outputs(model.model.layers[0].input_layernorm)
    fuse_rms_norms(model)
    assert isinstance(model.model.layers[0].input_layernorm, FusedRMSNorm)
    assert rebuilds_outputs(model.model.layers[0].input_layernorm)
    assert not rebuilds_outputs(model.model.norm)


class OffsetRMSNorm(nn.Module):
    """Gemma's formula, x / rms(x) * (1 + w): not the Llama one."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def test_norms_with_another_formula_hooks_or_no_weights_are_left_alone():
    model = tiny_llama()
    model.model.layers[0].input_layernorm = OffsetRMSNorm(32)
    model.model.layers[0].post_attention_layernorm.register_forward_pre_hook(lambda module, args: None)
    with torch.device("meta"):
        model.model.layers[1].input_layernorm = type(model.model.norm)(32)
    assert fuse_rms_norms(model) == 2  # layer 1's post-attention norm and the final norm
    assert isinstance(model.model.layers[0].input_layernorm, OffsetRMSNorm)
    assert not isinstance(model.model.layers[0].post_attention_layernorm, FusedRMSNorm)
    assert not isinstance(model.model.layers[1].input_layernorm, FusedRMSNorm)
