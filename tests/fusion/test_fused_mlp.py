"""fuse_gated_mlps: same keys and values, hooks keep firing, no forward replaced on an instance."""

import pytest
import torch

from lorakit import LoraConfig, add_adapter, fuse_gated_mlps
from lorakit.fusion.fused_mlp import FusedGatedMLP
from tests.models import randomize_adapters, tiny_llama, tokens


@pytest.mark.parametrize("lora_on_down", [False, True])
def test_hooks_on_down_proj_fire_and_values_stay(lora_on_down):
    model = tiny_llama()
    if lora_on_down:
        add_adapter(model, LoraConfig(r=2, targets=["down_proj"]))
        randomize_adapters(model)
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    keys = set(model.state_dict())
    assert fuse_gated_mlps(model) == 2
    assert set(model.state_dict()) == keys
    assert not any("forward" in vars(m) for m in model.modules())
    assert isinstance(model.model.layers[0].mlp, FusedGatedMLP)
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert seen == [(2, 12, 32)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_an_mlp_with_hooks_of_its_own_is_refused():
    model = tiny_llama()
    model.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp' \(and 0 more\) has hooks"):
        fuse_gated_mlps(model)
    assert not any(isinstance(m, FusedGatedMLP) for m in model.modules())


def test_the_lora_down_path_trains_like_the_unfused_mlp():
    results = []
    for fuse in (False, True):
        model = tiny_llama()
        add_adapter(model, LoraConfig(r=2, targets=["down_proj"]))
        randomize_adapters(model)
        if fuse:
            fuse_gated_mlps(model)
        loss = model(input_ids=tokens(), labels=tokens()).loss
        loss.backward()
        results.append([p.grad for n, p in model.named_parameters() if p.requires_grad])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
