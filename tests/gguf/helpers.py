"""Tiny bases and adapters for the GGUF tests, and oracles written independently of lorakit/gguf."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

import lorakit
from lorakit.core.walk import lora_layers
from tests.models import randomize_adapters, tiny_llama

HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def gguf_order(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order, written out index by index (the oracle for the reshape in lorakit):
    in each head of d rows, GGUF row 2i + j holds transformers row i + j * d/2 (rotary pairs side by side)."""
    d = rows.shape[0] // n_head
    out = np.empty_like(rows)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = rows[h * d + i + j * d // 2]
    return out


def gguf_name(path: str) -> str:
    """`blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj`."""
    parts = path.split(".")
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:5])]}.weight"


def heads_for(name: str, model: nn.Module) -> int | None:
    """The head count a Llama weight's rows are permuted with in GGUF, None when they are not."""
    if ".attn_q." in name:
        return int(model.config.num_attention_heads)
    if ".attn_k." in name:
        return int(model.config.num_key_value_heads)
    return None


def adapted_llama(config: lorakit.LoraConfig, seed: int = 0) -> nn.Module:
    """The tiny Llama with adapter "default" of `config`, every factor nonzero."""
    model = tiny_llama()
    lorakit.add_adapter(model, config)
    randomize_adapters(model, seed)
    return model


def expected_updates(model: nn.Module, name: str = "default") -> dict[str, np.ndarray]:
    """GGUF weight name -> scale * B @ A in float64, in transformers' row order, from the live layers."""
    updates = {}
    for layer in lora_layers(model):
        a, b = (t.detach().double() for t in layer.factors(name))
        updates[gguf_name(layer.path)] = (layer.scaling[name] * (b @ a)).numpy()
    return updates


def write_llama_gguf(model: nn.Module, path: Path, matrix_type: str = "F32") -> None:
    """The tiny Llama as a llama.cpp model GGUF, written the way llama.cpp's converter lays it out:
    q/k rows permuted, matrices in `matrix_type` (F32, F16 or Q8_0), norms in F32, a toy tokenizer."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_merges(["t 1", "t 2"])
    writer.add_bos_token_id(1)
    writer.add_chat_template(CHAT_TEMPLATE)
    qtype = getattr(gguf.GGMLQuantizationType, matrix_type)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        tensors[f"blk.{i}.attn_norm.weight"] = state[prefix + "input_layernorm.weight"]
        tensors[f"blk.{i}.ffn_norm.weight"] = state[prefix + "post_attention_layernorm.weight"]
        for hf, kind in HF_TO_GGUF.items():
            rows = state[f"{prefix}{hf}.weight"]
            heads = heads_for(f".{kind}.", model)
            tensors[f"blk.{i}.{kind}.weight"] = gguf_order(rows, heads) if heads else rows
    for name, values in tensors.items():
        if values.ndim == 1:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized to float64, in numpy's (out, in) order."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
        [int(n) for n in reversed(t.shape)]) for t in reader.tensors}


def save(model: nn.Module, folder: Path) -> Path:
    lorakit.save_adapter(model, folder)
    return folder


def base_folder(folder: Path) -> Path:
    """The tiny Llama saved as a transformers folder (the base the adapters above fit)."""
    tiny_llama().save_pretrained(folder)
    return folder

