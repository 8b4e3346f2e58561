import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, add_adapter, trainable_parameters
from lorakit.core.layers import LoraEmbedding, LoraLinear
from tests.models import MLP, logits, tiny_gpt2, tiny_llama, tokens


def test_fresh_adapter_is_bit_identical(hf_model):
    ids = tokens()
    before = hf_model(input_ids=ids).logits.detach()
    add_adapter(hf_model, LoraConfig(r=4, alpha=8))
    assert torch.equal(logits(hf_model, ids), before)
    assert hf_model.__class__.__name__.endswith(("ForCausalLM", "LMHeadModel", "ForSequenceClassification"))


def test_fresh_adapter_bit_identical_on_mlp():
    model = MLP()
    x = torch.randn(4, 16)
    before = model(x)
    add_adapter(model, LoraConfig(r=2, targets=["up", "down"], init="gaussian"))
    assert torch.equal(model(x), before)


def test_only_adapter_weights_train(hf_model):
    add_adapter(hf_model, LoraConfig(r=4, dropout=0.1))
    hf_model.train()
    out = hf_model(input_ids=tokens())
    out.logits.float().pow(2).mean().backward()
    for name, param in hf_model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert param.requires_grad == is_lora, name
        assert (param.grad is not None) == is_lora, name
    optimizer = torch.optim.AdamW(filter(lambda p: p.requires_grad, hf_model.parameters()))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    lora = {id(p) for n, p in hf_model.named_parameters() if "lora_" in n}
    assert held == lora


def test_gpt2_conv1d_is_wrapped_with_transposed_storage():
    model = tiny_gpt2()
    add_adapter(model, LoraConfig(r=4, targets=["c_attn", "c_proj"]))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)
    assert layer.lora_A["default"].weight.shape == (4, 32)
    assert layer.lora_B["default"].weight.shape == (96, 4)


def test_all_linear_skips_output_head_and_embeddings():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2))
    wrapped = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.lm_head, nn.Linear)


def test_regex_targets_exclude_and_layers():
    model = tiny_llama(layers=3)
    add_adapter(model, LoraConfig(r=2, targets=r".*\.(q_proj|v_proj)", exclude=["v_proj"], layers=[0, 2]))
    wrapped = sorted(p for p, m in model.named_modules() if isinstance(m, LoraLinear))
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_rank_and_alpha_patterns_are_applied():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                  alpha_pattern={"q_proj": 4}))
    attn = model.model.layers[0].self_attn
    assert attn.v_proj.lora_A["default"].out_features == 2 and attn.v_proj.scaling["default"] == 8.0
    assert attn.q_proj.lora_A["default"].out_features == 8 and attn.q_proj.scaling["default"] == 0.5


def test_embedding_adapter_trains_and_starts_identical():
    model = tiny_llama()
    ids = tokens()
    before = logits(model, ids)
    add_adapter(model, LoraConfig(r=4, targets=["embed_tokens"]))
    assert isinstance(model.model.embed_tokens, LoraEmbedding)
    assert torch.equal(logits(model, ids), before)
    model(input_ids=ids).logits.sum().backward()
    assert model.model.embed_tokens.lora_embedding_A["default"].grad.abs().sum() > 0


def test_bias_modes():
    model = tiny_gpt2()
    add_adapter(model, LoraConfig(r=2, targets=["c_attn"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.base.bias" in trainable
    assert "transformer.h.0.mlp.c_fc.bias" not in trainable

    model = tiny_gpt2()
    add_adapter(model, LoraConfig(r=2, targets=["c_attn"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.mlp.c_fc.bias" in trainable and "transformer.wte.weight" not in trainable


def test_modules_to_save_trains_a_copy():
    from tests.models import tiny_bert

    model = tiny_bert()
    original = model.classifier.weight.detach().clone()
    add_adapter(model, LoraConfig(r=2, targets=["query", "value"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.modules_to_save.default.weight" in trainable
    assert "classifier.original_module.weight" not in trainable
    model(input_ids=tokens()).logits.sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(model.classifier.original_module.weight, original)
    assert not torch.equal(model.classifier.modules_to_save["default"].weight, original)


def test_second_adapter_keeps_the_first():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, targets=["q_proj"]), name="a")
    add_adapter(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]), name="b")
    assert lorakit.list_adapters(model) == ["a", "b"]
    q = model.model.layers[0].self_attn.q_proj
    assert set(q.lora_A) == {"a", "b"}
    assert lorakit.active_adapters(model) == ["b"]
    assert not q.lora_A["a"].weight.requires_grad and q.lora_A["b"].weight.requires_grad


def test_trainable_count_llama_8b_on_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    add_adapter(model, LoraConfig(r=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable, total = trainable_parameters(model)
    assert trainable == 13_631_488
    assert total == 8_030_261_248 + trainable


def test_print_trainable_parameters_format(capsys):
    model = MLP()
    add_adapter(model, LoraConfig(r=2, targets=["up"]))
    lorakit.print_trainable_parameters(model)
    # up: 2 * (16 + 32) = 96 trainable; base 16*32+32 + 32*8+8 = 808
    assert capsys.readouterr().out.strip() == "trainable params: 96 || all params: 904 || trainable%: 10.6195"


def test_error_target_matches_nothing_lists_linear_names():
    model = tiny_llama()
    with pytest.raises(ValueError) as err:
        add_adapter(model, LoraConfig(targets=["qkv"]))
    message = str(err.value)
    assert "matched no module" in message and "'qkv'" in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message


def test_error_unsupported_module_names_supported_ones():
    model = tiny_llama()
    with pytest.raises(TypeError) as err:
        add_adapter(model, LoraConfig(targets=["input_layernorm"]))
    assert "LlamaRMSNorm" in str(err.value) and "nn.Linear" in str(err.value) and "Conv1D" in str(err.value)


def test_error_rank_too_large_and_model_untouched():
    model = MLP()
    with pytest.raises(ValueError) as err:
        add_adapter(model, LoraConfig(r=9, targets=["up", "down"]))
    assert "down (32 -> 8): r=9 > 8" in str(err.value)
    assert isinstance(model.up, nn.Linear) and not lorakit.list_adapters(model)


def test_error_duplicate_name():
    model = MLP()
    add_adapter(model, LoraConfig(r=2, targets=["up"]), name="x")
    with pytest.raises(ValueError, match="adapter 'x' already exists"):
        add_adapter(model, LoraConfig(r=2, targets=["up"]), name="x")
