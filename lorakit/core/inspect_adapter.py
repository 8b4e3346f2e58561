"""describe_adapter: a one-screen summary of an adapter folder, read without loading a model.

Only the JSON config and the safetensors header are read (shapes and dtypes), so inspecting a
large adapter is instant. This is what `lorakit inspect PATH` prints.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lorakit.core.peft_format import CONFIG_FILE, PICKLE_FILE, PREFIX, WEIGHTS_FILE

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_LORA_A = (".lora_A.weight", ".lora_embedding_A")


def describe_adapter(path: str | os.PathLike[str]) -> str:
    """A readable summary: base model, targets, r/alpha/scale per module group, parameters, file size, dtype.

    Raises:
        FileNotFoundError: `path` is not a folder holding adapter_config.json and adapter_model.safetensors.
        ValueError: the config is not JSON or the weights are not a safetensors file.
    """
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            pickle = " (only a pickled adapter_model.bin is there)" if (folder / PICKLE_FILE).is_file() else ""
            raise FileNotFoundError(f"{folder} is not an adapter folder: {needed.name} is missing{pickle}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            header = {k: handle.get_slice(k) for k in handle.keys()}
            shapes = {k: tuple(s.get_shape()) for k, s in header.items()}
            dtypes = Counter(_DTYPES.get(s.get_dtype(), s.get_dtype()) for s in header.values())
    except SafetensorError as err:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {err}") from None

    numel = {k: math.prod(shape) for k, shape in shapes.items()}
    modules = {k[len(PREFIX):-len(s)]: k for k in shapes for s in _LORA_A if k.endswith(s)}
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora"))
    targets = config.get("target_modules")
    lines = [
        ("adapter", str(folder)),
        ("base model", config.get("base_model_name_or_path") or "(not recorded)"),
        ("task", config.get("task_type") or "(none)"),
        ("method", f"{config.get('peft_type', '?')}, r={r}, alpha={alpha} (scale {_scale(alpha, r, rslora):g}"
                   f"{', rsLoRA' if rslora else ''}), dropout {config.get('lora_dropout', 0)}, "
                   f"bias {config.get('bias', 'none')}"),
        ("targets", targets if isinstance(targets, str) else ", ".join(targets or []) or "(none)"),
        ("adapted", f"{len(modules)} modules" + (f" in {n} layers" if (n := _layer_count(modules)) else "")),
    ]
    out = [f"{label:<12} {value}" for label, value in lines]
    out += ["", *_group_table(modules, shapes, config, rslora), ""]

    lora_keys = {k for key in modules.values() for k in (key, _b_key(key))}
    saved = set(config.get("modules_to_save") or [])
    copies: Counter[str] = Counter()
    biases = other = 0
    for key in shapes:
        if key in lora_keys:
            continue
        module = key[len(PREFIX):].rsplit(".", 1)[0]
        copy = next((name for name in saved if re.search(rf"(^|\.){re.escape(name)}(\.|$)", module)), None)
        if copy is not None:
            copies[copy] += numel[key]
        elif key.endswith(".bias"):
            biases += numel[key]
        else:
            other += numel[key]
    if copies:
        out.append(f"{'full copies':<12} " + ", ".join(f"{n} ({c:,} parameters)" for n, c in sorted(copies.items())))
    if biases:
        out.append(f"{'biases':<12} {biases:,} parameters")
    size = weights_path.stat().st_size
    dtype = ", ".join(f"{d} ({n} tensors)" if len(dtypes) > 1 else d for d, n in dtypes.most_common())
    # "other" is what PEFT writes beside a targeted embedding: the whole base layer, not trained.
    extra = f" (the file also holds {other:,} values of full base layers)" if other else ""
    out.append(f"{'parameters':<12} {sum(numel.values()) - other:,} trainable{extra}")
    out.append(f"{'file':<12} {_size(size)} ({WEIGHTS_FILE}), dtype {dtype or '(no tensors)'}")
    return "\n".join(out)


def _group_table(modules: dict[str, str], shapes: dict[str, tuple[int, ...]], config: dict,
                 rslora: bool) -> list[str]:
    """One row per module name (q_proj, ...): how many, in -> out, r, alpha, scale, parameters."""
    groups: dict[str, list[str]] = {}
    for path in modules:
        groups.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    rows = [("group", "modules", "in -> out", "r", "alpha", "scale", "parameters")]
    for group, paths in groups.items():
        ranks, alphas, scales, sizes, params = set(), set(), set(), set(), 0
        for path in paths:
            key_a = modules[path]
            rank, fan_in = shapes[key_a]
            fan_out = shapes[_b_key(key_a)][0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
            ranks.add(rank)
            alphas.add(alpha)
            scales.add(_scale(alpha, rank, rslora))
            sizes.add(f"{fan_in} -> {fan_out}")
            params += rank * (fan_in + fan_out)
        rows.append((group, str(len(paths)), _joined(sizes), _joined(ranks), _joined(alphas),
                     _joined({f"{s:g}" for s in scales}), f"{params:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 3, 4, 5, 6}
    return ["  " + "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def _b_key(key_a: str) -> str:
    """The B key beside an A key: `<path>.lora_A.weight` -> `<path>.lora_B.weight`."""
    for suffix in _LORA_A:
        if key_a.endswith(suffix):
            return key_a[: -len(suffix)] + suffix.replace("_A", "_B")
    raise AssertionError(key_a)


def _pattern_value(patterns: dict, path: str, default: float) -> float:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def _layer_count(modules: dict[str, str]) -> int:
    indices = {m.group(1) for path in modules if (m := re.search(r"(?:^|\.)(\d+)(?:\.|$)", path))}
    return len(indices)


def _joined(values: set) -> str:
    return ", ".join(str(v) for v in sorted(values, key=lambda v: (str(type(v)), v)))


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")
