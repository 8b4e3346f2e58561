"""fuse_for_training: lorakit.train's module changes, counted; a refusal changes nothing."""

import pytest

from lorakit import LoraConfig, add_adapter, fuse_for_training
from lorakit.fusion.fused_mlp import FusedGatedMLP
from lorakit.kernels.rebuild import rebuilds_outputs
from tests.models import tiny_llama


def test_it_fuses_the_mlps_and_groups_q_k_v():
    model = add_adapter(tiny_llama(), LoraConfig(r=4))
    assert fuse_for_training(model) == {"gated MLPs": 2, "attention blocks": 2}
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, FusedGatedMLP)
    assert layer.self_attn.q_proj.input_group is layer.self_attn.v_proj.input_group is not None
    assert rebuilds_outputs(layer.input_layernorm) and rebuilds_outputs(layer.post_attention_layernorm)
    assert fuse_for_training(model) == {"gated MLPs": 0, "attention blocks": 2}


def test_an_mlp_with_its_own_hook_leaves_the_model_as_it_was():
    model = add_adapter(tiny_llama(), LoraConfig(r=4))
    model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="has hooks"):
        fuse_for_training(model)
    assert [type(m) for m in model.modules()] == before
    assert not rebuilds_outputs(model.model.layers[0].input_layernorm)
