"""Tiny bases and adapters for the GGUF tests, and oracles written independently of lorakit/gguf."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

import lorakit
from lorakit.core.walk import lora_layers
from tests.hf.conftest import build_model, build_tokenizer
from tests.models import randomize_adapters

HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


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


def tiny_base() -> tuple[nn.Module, object]:
    """The tiny Llama (tied embeddings, 4 heads / 2 KV heads) and its BPE tokenizer that tests/hf writes as
    GGUF."""
    tokenizer = build_tokenizer()
    return build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id), tokenizer


def adapted_llama(config: lorakit.LoraConfig, seed: int = 0) -> nn.Module:
    """The tiny Llama with adapter "default" of `config`, every factor nonzero."""
    model, _ = tiny_base()
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


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized to float64, in numpy's (out, in) order."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
        [int(n) for n in reversed(t.shape)]) for t in reader.tensors}


def save(model: nn.Module, folder: Path) -> Path:
    lorakit.save_adapter(model, folder)
    return folder

