"""quantize_model on tiny random transformers models built in the test."""

import pytest
import torch
from torch import nn

from lorakit.quant import NF4Linear, quantize_model

transformers = pytest.importorskip("transformers")

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_llama(**overrides) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **overrides,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _nf4_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, NF4Linear)]


def test_quantized_llama_logits_stay_close():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits

    assert quantize_model(model) is model
    names = _nf4_names(model)
    assert len(names) == 2 * len(LINEAR_NAMES)
    assert {name.rsplit(".", 1)[1] for name in names} == set(LINEAR_NAMES)
    assert type(model.lm_head) is nn.Linear  # the output head stays full precision

    with torch.no_grad():
        logits = model(ids).logits
    # NF4 on N(0, 0.02) random weights: about 10% relative error on these logits.
    assert (logits - reference).norm() / reference.norm() < 0.2
    assert torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0) > 0.98
    assert model.generate(ids[:1, :4], max_new_tokens=2, do_sample=False).shape == (1, 6)


def test_gradients_flow_through_the_frozen_4bit_layers():
    model = quantize_model(_tiny_llama(), compute_dtype=torch.bfloat16)
    model.requires_grad_(False)
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    model(torch.randint(0, 128, (1, 8))).logits.float().square().mean().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_output_head_found_without_the_skip_name():
    model = quantize_model(_tiny_llama(), skip=())
    assert type(model.lm_head) is nn.Linear


def test_skip_matches_dotted_suffixes():
    model = quantize_model(_tiny_llama(), skip=("mlp.down_proj", "layers.0.self_attn.q_proj"))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, NF4Linear)
    # A suffix of a name part is not a match: "proj" keeps nothing.
    assert len(_nf4_names(quantize_model(_tiny_llama(), skip="proj"))) == 14


def test_gpt2_conv1d_layers_are_quantized():
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    quantize_model(model)
    assert {n.split("h.0.")[1] for n in _nf4_names(model)} == {
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_fc",
        "mlp.c_proj",
    }
    attn = model.transformer.h[0].attn.c_attn
    assert (attn.in_features, attn.out_features) == (32, 96)
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - reference).norm() / reference.norm() < 0.2


def test_refuses_a_second_quantization():
    model = quantize_model(_tiny_llama())
    with pytest.raises(
        ValueError, match=r"already quantized: 14 NF4Linear layers, e.g. 'model.layers.0.self_attn.q_proj'"
    ):
        quantize_model(model)


def test_refuses_a_model_with_lora_layers():
    model = _tiny_llama()
    model.model.layers[0].self_attn.q_proj.lora_A = nn.ModuleDict()
    with pytest.raises(ValueError, match="LoRA layers .*q_proj.*quantize the base model first"):
        quantize_model(model)


def test_argument_errors():
    with pytest.raises(ValueError, match="method must be one of nf4; got 'int8'"):
        quantize_model(_tiny_llama(), method="int8")
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D layer to quantize"):
        quantize_model(nn.Sequential(nn.Embedding(4, 4), nn.ReLU()))
    with pytest.raises(ValueError, match="use NF4Linear.from_linear"):
        quantize_model(nn.Linear(64, 64), skip=())


def test_the_estimate_and_quantize_model_pick_the_same_layers():
    from lorakit.core.walk import output_head
    from lorakit.quant.quantize_model import quantizable_linears
    from tests.models import tiny_llama

    model = tiny_llama()
    planned = quantizable_linears(model)
    assert output_head(model) is model.lm_head and "lm_head" not in planned
    quantize_model(model)
    assert planned == [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]
