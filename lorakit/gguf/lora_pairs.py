"""An adapter folder read as the (A, B, scale) pairs llama.cpp can take, each named by its GGUF weight.

Everything llama.cpp cannot apply is refused here, before any file is written: DoRA (it needs a
magnitude vector per weight), trained biases and modules_to_save (full tensors, not a low-rank
pair), embedding and output-head adapters, modules of an unsupported kind, and pairs whose
shapes do not fit the base model's weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from lorakit.gguf.architectures import accepted_modules, gguf_weight_name, rope_permute, weight_kind
from lorakit.gguf.base_model import BaseModel

_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: its update is scale * B @ A, shaped like the weight (out x in)."""

    module: str
    """The transformers module path (`model.layers.0.self_attn.q_proj`)."""
    gguf_name: str
    """The GGUF weight it updates (`blk.0.attn_q.weight`)."""
    a: np.ndarray
    """(r, in), float64."""
    b: np.ndarray
    """(out, r), float64, in transformers' row order."""
    scale: float
    """alpha / r (alpha / sqrt(r) with rsLoRA), with rank_pattern and alpha_pattern applied."""

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def read_lora_pairs(adapter: str | os.PathLike[str], base: BaseModel, purpose: str) -> list[LoraPair]:
    """The adapter's LoRA pairs, checked against `base`, in layer order.

    Args:
        adapter: an adapter folder (PEFT layout) or a training run's folder.
        base: the base model the pairs are written for.
        purpose: what the pairs are for, in error messages ("export", "merge").

    Raises:
        FileNotFoundError: no adapter there.
        ValueError: anything llama.cpp cannot take, or a pair that does not fit the base; one line.
    """
    from safetensors import safe_open

    from lorakit.formats.adapter_folder import find_adapter_folder, read_config_json
    from lorakit.formats.io import read_adapter
    from lorakit.formats.peft_format import PREFIX, WEIGHTS_FILE

    folder = find_adapter_folder(adapter)
    raw = read_config_json(folder)
    if isinstance(raw, dict) and raw.get("use_dora"):
        raise ValueError(f"cannot {purpose} adapter {folder}: it is a DoRA adapter (use_dora), and llama.cpp "
                         "applies plain LoRA pairs only; merge it into a transformers folder instead "
                         "(lorakit merge --output merged/)")
    config, _, header = read_adapter(folder)
    if config.bias != "none":
        raise ValueError(f"cannot {purpose} adapter {folder}: it trains biases (bias={config.bias!r}), "
                         "which are full tensors llama.cpp's LoRA loader does not take; only bias 'none' "
                         "adapters can be written")
    keys = [key.removeprefix(PREFIX) for key in header.shapes]
    others = sorted(key for key in keys if not key.endswith((_A, _B)))
    if others:
        what = ("embedding adapters (lora_embedding_A/B)" if any("lora_embedding" in k for k in others)
                else "modules_to_save (full trained copies)")
        raise ValueError(f"cannot {purpose} adapter {folder}: it holds {what}, e.g. {others[0]}, which "
                         f"llama.cpp's LoRA loader refuses; only LoRA on {accepted_modules(base.arch)} "
                         "can be written")
    modules = sorted({key.removesuffix(_A) for key in keys if key.endswith(_A)}, key=_layer_order)
    names = {module: gguf_weight_name(base.arch, module) for module in modules}
    unmapped = [module for module, name in names.items() if name is None]
    if unmapped:
        raise ValueError(f"cannot {purpose} adapter {folder}: llama.cpp has no LoRA slot for "
                         f"{len(unmapped)} of its modules "
                         f"({', '.join(unmapped[:3])}{', ...' if len(unmapped) > 3 else ''}); on a "
                         f"{base.arch.gguf_name} model it takes LoRA on {accepted_modules(base.arch)} only")
    if not modules:
        raise ValueError(f"cannot {purpose} adapter {folder}: it holds no LoRA pairs")
    pairs = []
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
        for module in modules:
            a = handle.get_tensor(f"{PREFIX}{module}{_A}").double().numpy()
            b = handle.get_tensor(f"{PREFIX}{module}{_B}").double().numpy()
            pairs.append(LoraPair(module, str(names[module]), a, b, config.scale_for(module)))
    _check_shapes(pairs, base, folder, purpose)
    return pairs


def gguf_rows(pair: LoraPair, rows: np.ndarray, base: BaseModel) -> np.ndarray:
    """`rows` (B, or a whole update, in transformers' row order) in the GGUF file's row order.

    Llama's q and k rows are permuted for llama.cpp's rotary layout (see architectures.py);
    every other weight keeps its order.
    """
    heads = base.arch.rope_permuted.get(weight_kind(pair.gguf_name))
    return rope_permute(rows, base.heads[heads]) if heads else rows


def _check_shapes(pairs: list[LoraPair], base: BaseModel, folder: object, purpose: str) -> None:
    wrong = []
    for pair in pairs:
        update = (pair.b.shape[0], pair.a.shape[1])
        have = base.shapes.get(pair.gguf_name)
        if have != update:
            wrong.append(f"{pair.module} updates a {update[0]} x {update[1]} weight, but the base's "
                         f"{pair.gguf_name} is " + (f"{have[0]} x {have[1]}" if have else "missing"))
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(f"cannot {purpose} adapter {folder}: it does not fit base model {base.source}: "
                         f"{wrong[0]}{more}; use the base it was trained on")


def _layer_order(module: str) -> tuple[int, str]:
    # blk.2 before blk.10: sort by the first number in the path, then by name.
    digits = next((int(part) for part in module.split(".") if part.isdigit()), -1)
    return digits, module
