"""LoraConfig: what one adapter looks like, validated once on construction."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.core.checks import is_finite_real, is_non_negative_int, is_positive_int, is_real

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", "zeros", "random")
SVD_INITS = ("pissa", "pissa_niter_N", "olora")
"""Inits that take A and B from the base weight and leave the residual W - s B A in the base."""
ALL_LINEAR = "all-linear"
_REGEX_CHARS = set("\\^$.|?*+()[]{}")


def parse_targets(text: str | Sequence[str]) -> str | tuple[str, ...]:
    """Targets as a person types them on a command line or in YAML, read as LoraConfig takes them.

    "all-linear" stays as is; text with regular-expression characters stays a regular expression;
    anything else is one or more comma-separated module names, so "q_proj" means ["q_proj"].
    """
    if not isinstance(text, str):
        return tuple(text)
    if text == ALL_LINEAR or _REGEX_CHARS & set(text):
        return text
    return tuple(part.strip() for part in text.split(",") if part.strip())


def path_matches(pattern: str | Sequence[str], path: str) -> bool:
    """Whether a module path matches `targets`-style selection (the one home of this rule).

    A string is a regular expression over the full path; a list holds module-name suffixes,
    matched at a dot: "lm_head" matches "lm_head" and "model.lm_head", not "xlm_head".
    """
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == key or path.endswith("." + key) for key in pattern)


@dataclass(frozen=True)
class LoraConfig:
    """Settings of one LoRA adapter: h = W0 x + s * B A x with s = alpha / r.

    Lists given for `targets`, `exclude`, `layers` and `modules_to_save` are stored as tuples.
    """

    r: int = 8
    """Rank of the update: A is (r x in), B is (out x r)."""
    alpha: float = 8
    """Numerator of the scale s = alpha / r (alpha / sqrt(r) with `use_rslora`)."""
    dropout: float = 0.0
    """Dropout on the adapter's input only; 0 means the input is used as is, with no copy."""
    targets: str | Sequence[str] = ALL_LINEAR
    """Module-name suffixes (["q_proj", "v_proj"]), a regular expression fully matching the module
    path, or "all-linear" (every Linear/Conv1D except the output head)."""
    exclude: str | Sequence[str] | None = None
    """Modules never adapted, given like `targets` (suffixes or a full-path regular expression)."""
    layers: Sequence[int] | None = None
    """Only adapt modules in these block indices (the first number in the module path)."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Per-module rank overrides: key is a regular expression matching the end of the module path."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, keys as in `rank_pattern`."""
    bias: str = "none"
    """Which biases train: "none", "all" (every bias in the model) or "lora_only" (adapted modules')."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: s = alpha / sqrt(r), so larger ranks keep learning at the same rate."""
    init: str = "kaiming"
    """A's initialisation: "kaiming" (uniform, a=sqrt(5), the reference), "gaussian" (std 1/r); B starts
    at zero for both, so a fresh adapter changes nothing. "zeros" makes A and B zero (a placeholder to
    load weights into), "random" makes B random too (a non-identity adapter, for tests).
    "pissa" (full SVD), "pissa_niter_N" (randomized SVD, N iterations) and "olora" (QR) take A and B
    from the base weight and leave the residual W - s B A in the base (core/init_methods.py); linear
    targets only, and on a 4-bit base only with `allow_requantize`."""
    allow_requantize: bool = False
    """With a PiSSA/OLoRA init on a 4-bit (NF4) base: quantize the residual again (which adds a
    quantization error, reported). Without it such an init on a 4-bit base is refused."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA): each adapted row also learns a magnitude m (out,), and the layer
    computes (m / ||W + s B A||_row) (W x + s B A x) + bias, the norm detached (core/dora.py). Linear,
    Conv1D and 4-bit bases; not embeddings. Saved as PEFT's `lora_magnitude_vector`."""
    modules_to_save: Sequence[str] | None = None
    """Modules (suffixes) trained in full beside the adapter, e.g. a classification head."""
    share_dropout_mask: bool = True
    """With dropout: whether modules reading the same input (q, k and v; gate and up) use one dropout
    mask together (True, lorakit's behaviour so far: one draw per input instead of one per module)
    or each draw their own (False, as PEFT and the LoRA paper do, so the modules' noise is
    independent). Only the training noise differs: values in eval mode and adapter files are the
    same either way, and the setting is not written to adapter_config.json."""

    def __post_init__(self) -> None:
        # Only values of the right kind are normalised; any other is left as given, so that
        # _problems names it (targets=5 was "'int' object is not iterable" from tuple()).
        for name in ("targets", "exclude", "modules_to_save", "layers"):
            value = getattr(self, name)
            if _is_list_like(value):
                object.__setattr__(self, name, tuple(value))
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, dict(value))
        problems = self._problems()
        if problems:
            raise ValueError("invalid LoraConfig:\n  " + "\n  ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if not is_positive_int(self.r):
            problems.append(f"r must be an integer >= 1, got {self.r!r}")
        if not is_finite_real(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha must be a number > 0, got {self.alpha!r}")
        if not is_real(self.dropout):
            problems.append(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        elif not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            problems.append(f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        for name in ("use_rslora", "allow_requantize", "use_dora", "share_dropout_mask"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not is_init(self.init):
            problems.append(f"init must be one of {', '.join(INIT_MODES + SVD_INITS)} "
                            f"(N an integer >= 1, e.g. pissa_niter_4), got {self.init!r}")
        problems += _pattern_problems("targets", self.targets, allow_none=False)
        problems += _pattern_problems("exclude", self.exclude, allow_none=True)
        if self.modules_to_save is not None and not (
                isinstance(self.modules_to_save, tuple)
                and all(isinstance(v, str) and v for v in self.modules_to_save)):
            problems.append(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if self.layers is not None and not isinstance(self.layers, tuple):
            problems.append("layers must be a list of non-negative block indices (e.g. [0, 1]), "
                            f"got {self.layers!r}")
        elif self.layers is not None and not all(is_non_negative_int(i) for i in self.layers):
            problems.append(f"layers must be non-negative block indices, got {list(self.layers)!r}")
        problems += _mapping_problems("rank_pattern", self.rank_pattern, "rank", {"v_proj": 4},
                                      is_positive_int, "an integer >= 1")
        problems += _mapping_problems("alpha_pattern", self.alpha_pattern, "alpha", {"v_proj": 16},
                                      lambda alpha: is_finite_real(alpha) and alpha > 0, "a number > 0")
        return problems

    def rank_for(self, path: str) -> int:
        """The rank used for the module at `path` (a `rank_pattern` match, else `r`)."""
        key = _pattern_key(self.rank_pattern, path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        """The alpha used for the module at `path` (an `alpha_pattern` match, else `alpha`)."""
        key = _pattern_key(self.alpha_pattern, path)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scale_for(self, path: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA, for the module at `path`."""
        rank = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(rank) if self.use_rslora else rank)


def is_init(init: object) -> bool:
    """Whether `init` names an initialisation: INIT_MODES or an SVD init (`is_svd_init`)."""
    return init in INIT_MODES or is_svd_init(init)


def is_svd_init(init: object) -> bool:
    """Whether `init` takes the factors from the base weight: "pissa", "pissa_niter_N" (N >= 1) or "olora"."""
    if not isinstance(init, str):
        return False
    niter = re.fullmatch(r"pissa_niter_(\d+)", init)
    return init in ("pissa", "olora") or (niter is not None and int(niter.group(1)) >= 1)


def _pattern_key(patterns: Mapping[str, object], path: str) -> str | None:
    # Same rule as PEFT's rank_pattern: the key must match a whole trailing part of the path.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _is_list_like(value: object) -> bool:
    """A list, tuple or set of items (what tuple() reads item by item); text, bytes and mappings are not."""
    return isinstance(value, Iterable) and not isinstance(value, str | bytes | Mapping)


def _mapping_problems(name: str, value: object, what: str, example: dict[str, int],
                      valid: Callable[[Any], bool], accepted: str) -> list[str]:
    """Problems of a `rank_pattern`-like field: its kind, its keys (regular expressions), then its values."""
    if not isinstance(value, dict):
        return [f"{name} must be a mapping of module-path regular expression to {what} (e.g. {example!r}), "
                f"got {value!r}"]
    problems = []
    for key in value:
        if isinstance(key, str):
            problems += _regex_problems(f"{name} key {key!r}", key)
        else:
            problems.append(f"{name} keys must be regular expressions (text), got {key!r}")
    return problems + [f"{name}[{key!r}] must be {accepted}, got {item!r}" for key, item in value.items()
                       if not valid(item)]


def _pattern_problems(name: str, value: object, allow_none: bool) -> list[str]:
    if value is None:
        return [] if allow_none else [f"{name} must be given"]
    if isinstance(value, str):
        return [] if value == ALL_LINEAR else _regex_problems(name, value)
    # Lists were made tuples in __post_init__: anything else here is of the wrong kind (5, b"q_proj").
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        return [f"{name} must be a regular expression or a list of module names, got {value!r}"]
    if len(value) == 0 and not allow_none:
        return [f"{name} must not be an empty list"]
    return []


def _regex_problems(name: str, pattern: str) -> list[str]:
    try:
        re.compile(pattern)
    except re.error as err:
        return [f"{name} is not a valid regular expression ({err}): {pattern!r}"]
    return []
