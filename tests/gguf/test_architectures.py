"""The other architectures' names: every all-linear module lands on the GGUF weight llama.cpp's converter
names, with rows permuted for Llama and Mistral only, and GPT-2's Conv1D updates in out x in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.walk import lora_layers
from lorakit.gguf.export_adapter import export_adapter
from tests.gguf.helpers import gguf_order, read_tensors
from tests.models import randomize_adapters, tiny_gpt2


def _tiny(kind: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    shared = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    builders = {
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**shared)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**shared)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**shared, head_dim=8)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**shared, pad_token_id=0)),
        "gpt2": tiny_gpt2,
    }
    return builders[kind]().eval()


EXPECTED = {
    "mistral": {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"},
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
    "gpt2": {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up",
             "mlp.c_proj": "ffn_down"},
}
EXPECTED["qwen2"] = EXPECTED["gemma"] = EXPECTED["mistral"]
GGUF_ARCH = {"mistral": "llama", "qwen2": "qwen2", "gemma": "gemma", "phi3": "phi3", "gpt2": "gpt2"}


@pytest.mark.parametrize("kind", sorted(GGUF_ARCH))
def test_names_and_updates(kind: str, tmp_path: Path) -> None:
    import gguf

    model = _tiny(kind)
    model.save_pretrained(tmp_path / "base")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "ad")
    out = tmp_path / "a.gguf"
    export_adapter(tmp_path / "ad", out, base=str(tmp_path / "base"), outtype="f32")
    assert gguf.GGUFReader(out).get_field("general.architecture").contents() == GGUF_ARCH[kind]
    tensors = read_tensors(out)
    seen = set()
    for layer in lora_layers(model):
        index, inner = layer.path.split(".h." if kind == "gpt2" else ".layers.")[1].split(".", 1)
        name = f"blk.{index}.{EXPECTED[kind][inner]}.weight"
        seen |= {f"{name}.lora_a", f"{name}.lora_b"}
        a, b = (t.detach().double().numpy() for t in layer.factors("default"))
        want = layer.scaling["default"] * b @ a  # (out, in) for Conv1D too: PEFT's A is r x in, B out x r
        heads = {"attn_q": 4, "attn_k": 2}.get(EXPECTED[kind][inner]) if kind == "mistral" else None
        want = gguf_order(want, heads) if heads else want
        got = 8 / 4 * tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=layer.path)
    assert seen == set(tensors)
