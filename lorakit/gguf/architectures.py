"""Which models lorakit writes GGUF for, and where each adapted module's weight lives in a GGUF file.

A LoRA adapter names modules by their transformers path (`model.layers.3.self_attn.q_proj`); a
GGUF file names the same weight `blk.3.attn_q.weight`. The table below gives, per architecture,
the seven linear kinds llama.cpp applies LoRA to (through `build_lora_mm`), as llama.cpp's
converter (convert_hf_to_gguf.py and gguf-py's tensor_mapping.py) names them.

llama.cpp's converter also reorders the rows of Llama's q and k weights for its rotary layout
(`LlamaModel.permute`): within each head, rotary pairs (i, i + d/2) become adjacent rows
(2i, 2i + 1). Everything written for those weights must be reordered the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Architecture:
    """How one model family's transformers modules map to GGUF tensor names."""

    gguf_name: str
    """`general.architecture` in GGUF files of this family."""
    layer_pattern: str
    """Regex over a transformers module path: the layer index, then the module's path inside the layer."""
    kinds: dict[str, str]
    """Module path inside a layer -> GGUF tensor kind (`self_attn.q_proj` -> `attn_q`)."""
    rope_permuted: dict[str, str] = field(default_factory=dict)
    """GGUF kind -> which head count its rows are permuted with ("head_count" or "head_count_kv")."""


_LLAMA_LAYOUT = r"model\.layers\.(\d+)\.(.+)"
_LLAMA_KINDS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
_LLAMA = Architecture("llama", _LLAMA_LAYOUT, _LLAMA_KINDS,
                      rope_permuted={"attn_q": "head_count", "attn_k": "head_count_kv"})

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,  # llama.cpp converts MistralForCausalLM as a Llama (same names, same permutation)
    "qwen2": Architecture("qwen2", _LLAMA_LAYOUT, _LLAMA_KINDS),
    "gemma": Architecture("gemma", _LLAMA_LAYOUT, _LLAMA_KINDS),
    # Phi-3 fuses q, k, v into qkv_proj and gate, up into gate_up_proj (GGUF: attn_qkv, ffn_up).
    "phi3": Architecture("phi3", _LLAMA_LAYOUT, {
        "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
        "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}),
    # GPT-2's Conv1D weights are stored in x out; the converter transposes them to out x in, the
    # orientation PEFT's lora_A (r x in) and lora_B (out x r) already have.
    "gpt2": Architecture("gpt2", r"transformer\.h\.(\d+)\.(.+)", {
        "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down"}),
}
"""transformers `model_type` (or GGUF `general.architecture`) -> its mapping."""

SUPPORTED = ", ".join(sorted(ARCHITECTURES))


def architecture(name: str, source: str) -> Architecture:
    """The mapping for a model type or GGUF architecture name.

    Raises:
        ValueError: an architecture without a mapping, naming the supported ones.
    """
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"{source} is a {name!r} model; lorakit writes GGUF for these architectures only: "
                         f"{SUPPORTED}") from None


def gguf_weight_name(arch: Architecture, module_path: str) -> str | None:
    """`blk.N.<kind>.weight` for a transformers module path, or None when llama.cpp has no LoRA slot
    for it."""
    match = re.fullmatch(arch.layer_pattern, module_path)
    if match is None or match.group(2) not in arch.kinds:
        return None
    return f"blk.{match.group(1)}.{arch.kinds[match.group(2)]}.weight"


def weight_kind(gguf_name: str) -> str:
    """`attn_q` for `blk.3.attn_q.weight`."""
    return gguf_name.split(".")[2]


def accepted_modules(arch: Architecture) -> str:
    """The module names llama.cpp takes LoRA on, for error messages."""
    return ", ".join(name.rsplit(".", 1)[-1] for name in arch.kinds)


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q or k weight (or a LoRA B) from transformers' rotary layout to GGUF's.

    Rows come in heads of d; transformers rotates row i with row i + d/2, llama.cpp with its
    neighbour, so row i + d/2 moves next to row i: (heads, 2, d/2, ...) -> (heads, d/2, 2, ...).

    Args:
        rows: (n_head * d, ...) array, first axis the weight's output rows.
        n_head: heads in this weight (the KV head count for k).
    """
    if rows.shape[0] % (2 * n_head):
        raise ValueError(f"cannot split {rows.shape[0]} rows into {n_head} heads of an even size")
    return (rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))
