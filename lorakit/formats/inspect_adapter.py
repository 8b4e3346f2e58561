"""describe_adapter: a one-screen summary of an adapter folder, read without loading a model.

Only the JSON config and the safetensors header are read (shapes and dtypes), so inspecting a
large adapter is instant. This is what `lorakit inspect PATH` prints. The folder goes through
the loader's own checks (adapter_folder.py, config_from_json, rank_problems), and whatever
load_adapter would refuse before seeing a model is listed under "problems:".
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from lorakit.core.config import LoraConfig
from lorakit.core.layers import DORA_KEY
from lorakit.formats.adapter_folder import (
    DTYPE_NAMES,
    Header,
    check_adapter_files,
    dtype_problems,
    find_adapter_folder,
    read_config_json,
    read_header,
)
from lorakit.formats.peft_format import (
    BASE_QUANTIZATION,
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    a_suffixes,
    config_from_json,
    rank_problems,
)


@dataclass(frozen=True)
class AdapterReport:
    """What `lorakit inspect` prints: the summary, and the problems that would stop load_adapter."""

    text: str
    """The summary, ending with a "problems:" section when there are any."""
    problems: list[str]
    """One message per problem (a message may continue on indented lines)."""


def describe_adapter(path: str | os.PathLike[str]) -> str:
    """A readable summary: base model, targets, r/alpha/scale per module group, parameters, file size, dtype.

    `path` may also be a training run's output folder, whose `adapter/` is described. Problems
    that load_adapter would refuse (an unsupported or invalid config, ranks that differ from the
    config, integer tensors) are listed at the end under "problems:"; see inspect_adapter.

    Raises:
        FileNotFoundError: `path` is not a folder holding adapter_config.json and adapter_model.safetensors.
        ValueError: only a pickle is there, or the config is not a JSON object.
    """
    return inspect_adapter(path).text


def inspect_adapter(path: str | os.PathLike[str]) -> AdapterReport:
    """describe_adapter's summary together with the list of problems found.

    Raises:
        FileNotFoundError: `path` is not a folder holding adapter_config.json and adapter_model.safetensors.
        ValueError: only a pickle is there, or the config is not a JSON object (nothing to describe).
    """
    folder = find_adapter_folder(path)
    check_adapter_files(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    raw = read_config_json(folder)
    problems: list[str] = []
    config: LoraConfig | None = None
    try:
        config = config_from_json(raw, str(config_path))
    except ValueError as err:
        if not isinstance(raw, dict):
            raise  # a list, a number...: nothing of the summary can be read from it
        problems.append(str(err))
    assert isinstance(raw, dict)
    try:
        header = read_header(weights_path)
    except ValueError as err:
        problems.append(str(err))
        header = Header({}, {}, {})
    problems += dtype_problems(header.dtypes, weights_path)
    if config is not None:
        problems += rank_problems(config, header.shapes)
    modules, unpaired = _lora_modules(header.shapes)
    problems += unpaired

    out = [f"{label:<12} {value}" for label, value in _summary(folder, raw, config, header, modules)]
    out += ["", *_group_table(modules, header.shapes, raw, config), ""]
    out += _other_tensors(header.shapes, modules, raw, config)
    size = weights_path.stat().st_size
    dtypes = Counter(DTYPE_NAMES.get(code, code) for code in header.dtypes.values())
    dtype = ", ".join(f"{d} ({n} tensors)" if len(dtypes) > 1 else d for d, n in dtypes.most_common())
    out.append(f"{'file':<12} {_size(size)} ({WEIGHTS_FILE}), dtype {dtype or '(no tensors)'}")
    if problems:
        out += ["", "problems:"]
        out += ["  " + line for problem in problems for line in problem.splitlines()]
    return AdapterReport("\n".join(out), problems)


def _summary(folder: Path, raw: dict, config: LoraConfig | None, header: Header,
             modules: dict[str, str]) -> list[tuple[str, str]]:
    """(label, value) rows; raw config values are shown as written when the config is invalid."""
    trained = {"nf4": "a 4-bit NF4 base (load the base with --quantize nf4)",
               "none": "an unquantized base"}.get(header.metadata.get(BASE_QUANTIZATION) or "")
    if config is not None:
        plain = replace(config, rank_pattern={}, alpha_pattern={})  # the scale of modules without an override
        scale = f" (scale {plain.scale_for(''):g}{', rsLoRA' if config.use_rslora else ''})"
        variant = " + DoRA" if config.use_dora else ""
        method = (f"LORA{variant}, r={config.r}, alpha={config.alpha:g}{scale}, dropout {config.dropout}, "
                  f"bias {config.bias}")
    else:
        method = ", ".join(f"{key}={raw.get(key)!r}"
                           for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias") if key in raw)
    targets = config.targets if config is not None else raw.get("target_modules")
    layers = _layer_count(modules)
    return [
        ("adapter", str(folder)),
        ("base model", str(raw.get("base_model_name_or_path") or "(not recorded)")),
        *([("trained on", trained)] if trained else []),
        ("task", str(raw.get("task_type") or "(none)")),
        ("method", method),
        ("targets", _listed(targets)),
        ("adapted", f"{len(modules)} modules" + (f" in {layers} layers" if layers else "")),
    ]


def _lora_modules(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, str], list[str]]:
    """(module path -> its A key, for complete 2-D A/B pairs; a problem per incomplete pair)."""
    modules, problems = {}, []
    for key, shape in shapes.items():
        for suffix in a_suffixes():
            if key.startswith(PREFIX) and key.endswith(suffix):
                path, key_b = key[len(PREFIX):-len(suffix)], _b_key(key)
                if key_b not in shapes:
                    problems.append(f"module {path!r} has {suffix[1:]} but no {_b_key(suffix)[1:]}")
                elif len(shape) != 2 or len(shapes[key_b]) != 2:
                    problems.append(f"module {path!r}: LoRA factors must be 2-D, the file has shapes "
                                    f"{tuple(shape)} and {tuple(shapes[key_b])}")
                else:
                    modules[path] = key
    for key in shapes:
        for suffix in a_suffixes():
            key_b = _b_key(suffix)
            if key.startswith(PREFIX) and key.endswith(key_b) and key[: -len(key_b)] + suffix not in shapes:
                problems.append(f"module {key[len(PREFIX):-len(key_b)]!r} has {key_b[1:]} "
                                f"but no {suffix[1:]}")
    return modules, problems


def _group_table(modules: dict[str, str], shapes: dict[str, tuple[int, ...]], raw: dict,
                 config: LoraConfig | None) -> list[str]:
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
            ranks.add(rank)
            # Alpha and scale as the loader computes them; unknown while the config is invalid.
            alphas.add(f"{config.alpha_for(path):g}" if config is not None
                       else str(raw.get("lora_alpha", "?")))
            scales.add(f"{config.scale_for(path):g}" if config is not None else "?")
            sizes.add(f"{fan_in} -> {fan_out}")
            params += rank * (fan_in + fan_out)
        rows.append((group, str(len(paths)), _joined(sizes), _joined(ranks), _joined(alphas), _joined(scales),
                     f"{params:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 3, 4, 5, 6}
    return ["  " + "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def _other_tensors(shapes: dict[str, tuple[int, ...]], modules: dict[str, str], raw: dict,
                   config: LoraConfig | None) -> list[str]:
    """Lines for the full copies (modules_to_save), biases and the trainable parameter count."""
    numel = {k: math.prod(shape) for k, shape in shapes.items()}
    lora_keys = {k for key in modules.values() for k in (key, _b_key(key))}
    listed = config.modules_to_save if config is not None else raw.get("modules_to_save")
    saved = ([name for name in (listed or []) if isinstance(name, str)]
             if isinstance(listed, list | tuple) else [])
    copies: Counter[str] = Counter()
    biases = other = magnitudes = 0
    for key in shapes:
        if key in lora_keys:
            continue
        if key.endswith("." + DORA_KEY):
            magnitudes += numel[key]
            continue
        module = key[len(PREFIX):].rsplit(".", 1)[0]
        copy = next((name for name in saved if re.search(rf"(^|\.){re.escape(name)}(\.|$)", module)), None)
        if copy is not None:
            copies[copy] += numel[key]
        elif key.endswith(".bias"):
            biases += numel[key]
        else:
            other += numel[key]
    out = []
    if copies:
        out.append(f"{'full copies':<12} "
                   + ", ".join(f"{n} ({c:,} parameters)" for n, c in sorted(copies.items())))
    if biases:
        out.append(f"{'biases':<12} {biases:,} parameters")
    if magnitudes:
        out.append(f"{'DoRA':<12} {magnitudes:,} magnitude values (one per output row)")
    # "other" is what PEFT writes beside a targeted embedding: the whole base layer, not trained.
    extra = f" (the file also holds {other:,} values of full base layers)" if other else ""
    out.append(f"{'parameters':<12} {sum(numel.values()) - other:,} trainable{extra}")
    return out


def _b_key(key_a: str) -> str:
    """The B key beside an A key: `<path>.lora_A.weight` -> `<path>.lora_B.weight`."""
    for suffix in a_suffixes():
        if key_a.endswith(suffix):
            return key_a[: -len(suffix)] + suffix.replace("_A", "_B")
    raise AssertionError(key_a)


def _listed(targets: object) -> str:
    if isinstance(targets, str):
        return targets
    if isinstance(targets, list | tuple) and all(isinstance(t, str) for t in targets):
        return ", ".join(targets) or "(none)"
    return "(none)" if targets is None else repr(targets)


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
