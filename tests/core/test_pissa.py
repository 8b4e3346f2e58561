"""PiSSA and OLoRA: factors from the base weight, the residual base, conversion to a plain LoRA for
the original base (checked with lorakit and PEFT), NF4 re-quantization, and the refusals."""

import json
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, add_adapter
from lorakit.core.layers import LoraLinear
from lorakit.formats.io import load_adapter, save_adapter
from lorakit.quant import quantize_model
from tests.models import logits, tiny_gpt2, tiny_llama, tokens

INITS = ["pissa", "pissa_niter_4", "olora"]


def train_a_little(model, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_a_fresh_adapter_changes_nothing_and_the_base_holds_the_residual(init, builder):
    model = builder()
    ids = tokens()
    expected = logits(model, ids)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_adapter(model, LoraConfig(r=4, alpha=8, init=init))
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    key = [n for n, p in original.items()
           if p.shape == layer.base.weight.shape and n.startswith(layer.path)][0]
    torch.testing.assert_close(layer.base.weight + layer.delta_weight("default"), original[key],
                               rtol=0, atol=1e-6)
    assert not torch.allclose(layer.base.weight, original[key])


def test_pissa_takes_the_top_singular_part_and_olora_the_qr_part_in_float64():
    torch.manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(20, 12, dtype=torch.float64))
    spectrum = torch.tensor([9.0, 6.0, 4.0] + [0.1 / k for k in range(1, 10)], dtype=torch.float64)
    weight = (left * spectrum) @ right.T  # a clear top-3 part, as trained weights have
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    pissa = LoraLinear(nn.Linear(20, 12).double())
    pissa.base.weight.data.copy_(weight)
    pissa.add("default", 3, 2.0, init="pissa")
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(pissa.delta_weight("default").double(), best, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pissa.base.weight, weight - best, rtol=1e-5, atol=1e-5)
    fast = LoraLinear(nn.Linear(20, 12).double())
    fast.base.weight.data.copy_(weight)
    fast.add("default", 3, 2.0, init="pissa_niter_8")
    torch.testing.assert_close(fast.delta_weight("default").double(), best, rtol=1e-3, atol=1e-3)
    olora = LoraLinear(nn.Linear(20, 12).double())
    olora.base.weight.data.copy_(weight)
    olora.add("default", 3, 2.0, init="olora")
    q, r = torch.linalg.qr(weight)
    a, b = olora.factors("default")
    torch.testing.assert_close(b, q[:, :3]), torch.testing.assert_close(a, r[:3])


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_converted_adapter_on_the_original_base_gives_the_trained_models_logits(init, use_dora, tmp_path):
    model = add_adapter(tiny_llama(), LoraConfig(r=4, alpha=8, init=init, use_dora=use_dora))
    train_a_little(model)
    ids = tokens()
    expected = logits(model, ids)
    save_adapter(model, tmp_path, convert_to_lora=True)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (8, 16, True)
    ours = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain LoRA for the original base: no residual warning
        load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=0, atol=1e-5)


def test_rslora_conversion_keeps_the_scale(tmp_path):
    model = add_adapter(tiny_llama(), LoraConfig(r=4, alpha=8, init="pissa_niter_2", use_rslora=True,
                                                 rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3}))
    train_a_little(model)
    ids = tokens()
    expected = logits(model, ids)
    save_adapter(model, tmp_path, convert_to_lora=True)
    ours = tiny_llama()
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)


def test_without_conversion_the_config_says_it_needs_the_residual_base_and_a_plain_base_warns(tmp_path):
    model = add_adapter(tiny_llama(), LoraConfig(r=4, alpha=8, init="pissa_niter_4"))
    train_a_little(model)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa_niter_4"
    with pytest.warns(UserWarning, match=r"init 'pissa_niter_4' on the residual base .* "
                                         r"convert_to_lora=True"):
        load_adapter(tiny_llama(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # back into its own residual model: no warning
        load_adapter(model, tmp_path, replace=True)


def test_convert_to_lora_without_initial_factors_is_a_clear_error(tmp_path):
    model = add_adapter(tiny_llama(), LoraConfig(r=4))
    with pytest.raises(ValueError, match=r"convert_to_lora needs the initial factors A0, B0 of adapter "
                                         r"'default'.*its init: 'kaiming'"):
        save_adapter(model, tmp_path / "out", convert_to_lora=True)
    assert not (tmp_path / "out").exists()


def test_a_4bit_base_is_refused_unless_requantization_is_allowed():
    model = quantize_model(tiny_llama())
    ids = tokens()
    expected = logits(model, ids)
    codes = {n: b.clone() for n, b in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"init 'pissa' turns the base weight into the residual .* "
                                         r"is 4-bit: pass allow_requantize=True"):
        add_adapter(model, LoraConfig(r=4, init="pissa"))
    assert lorakit.list_adapters(model) == []
    assert all(torch.equal(t, codes[n]) for n, t in model.state_dict().items())
    with pytest.warns(UserWarning, match=r"quantized again, so Q\(W - s B A\) \+ s B A differs from Q\(W\): "
                                         r"relative error .* mean (\d\.\d\de-\d\d), max"):
        add_adapter(model, LoraConfig(r=4, alpha=8, init="pissa", allow_requantize=True))
    layer = model.model.layers[0].self_attn.q_proj
    assert 0 < layer.requantization_error["default"] < 0.2
    gap = (logits(model, ids) - expected).abs().max().item()
    assert 0 < gap < 0.1  # the re-quantized residual: close to the base, not equal


def test_svd_inits_refuse_embeddings():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"init 'olora' works on linear layers, not on the embedding"):
        add_adapter(model, LoraConfig(r=2, targets=["q_proj", "embed_tokens"], init="olora"))
    assert lorakit.list_adapters(model) == []


@pytest.mark.parametrize("init", ["pissa_niter_0", "pissa_niter_x", "svd"])
def test_bad_init_names(init):
    with pytest.raises(ValueError, match=rf"init must be one of .*pissa_niter_N, olora .* got {init!r}"):
        LoraConfig(init=init)
