"""What every benchmark shares: the setting, the models, the batches, the memory probes, the child runs.

Each measured configuration runs in its own child process (`python -m benchmarks.<module> ...`),
because a process's peak RSS never goes down: two configurations in one process would report
the larger peak for both. A child prints one line `RESULT {json}` on stdout, which `run_child`
picks out of whatever else transformers and PEFT print.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULT_PREFIX = "RESULT "
ROOT = Path(__file__).resolve().parent.parent

# Random-weight Llama shapes for the CUDA section (TinyLlama-1.1B's widths) and a tiny one that
# runs the same code path on a CPU in seconds, to check it without a GPU.
RANDOM_MODELS: dict[str, dict[str, int]] = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000),
    "llama-tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=32000),
}


@dataclass(frozen=True)
class Setting:
    """One training configuration, the same for both libraries."""

    model: str = "default"
    """Which base model: "default" (SmolLM2-135M-Instruct, via lorakit's loader) or a key of RANDOM_MODELS."""
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 4
    seq: int = 256
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    lr: float = 1e-4

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def to_args(self) -> list[str]:
        """Command-line flags that rebuild this setting in a child (see `add_setting_args`)."""
        return [arg for f in fields(self) for arg in (f"--{f.name}", str(getattr(self, f.name)))]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_setting_args(parser: Any) -> None:
    for f in fields(Setting):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)


def setting_from_args(args: Any) -> Setting:
    return Setting(**{f.name: getattr(args, f.name) for f in fields(Setting)})


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_model(setting: Setting, seed: int = 0) -> nn.Module:
    """The base model in train-ready form; random models are seeded, so every child builds the same one."""
    if setting.model == "default":
        from lorakit.hf.loading import load_model

        model, _ = load_model("default", dtype=setting.dtype, device=setting.device)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**RANDOM_MODELS[setting.model], max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(setting.device):
        model = LlamaForCausalLM(config)
    return model.to(torch_dtype(setting.dtype))


def model_shape(model: nn.Module) -> dict[str, int]:
    """The widths the FLOP count needs, read from a transformers Llama-style config."""
    config = model.config  # type: ignore[union-attr]
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return dict(hidden=int(config.hidden_size), intermediate=int(config.intermediate_size),
                layers=int(config.num_hidden_layers), heads=heads, kv_heads=int(config.num_key_value_heads),
                head_dim=head_dim, vocab=int(config.vocab_size))


def batch_ids(step: int, setting: Setting, vocab: int) -> torch.Tensor:
    """Token ids of batch number `step`: (batch, seq), the same in every process for the same step."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (setting.batch, setting.seq), generator=generator).to(setting.device)


# ---- attaching the same adapter with either library ----------------------------------------------

def add_lorakit(model: nn.Module, setting: Setting, dropout: float | None = None) -> nn.Module:
    from lorakit import LoraConfig, add_adapter

    config = LoraConfig(r=setting.r, alpha=setting.alpha,
                        dropout=setting.dropout if dropout is None else dropout, targets=list(TARGETS))
    return add_adapter(model, config)


def add_peft(model: nn.Module, setting: Setting, dropout: float | None = None) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=setting.r, lora_alpha=setting.alpha,
                             lora_dropout=setting.dropout if dropout is None else dropout,
                             target_modules=list(TARGETS), bias="none")
    return peft.get_peft_model(model, config)  # type: ignore[return-value]


def adapter_key(param_name: str) -> str:
    """A LoRA parameter's name with the library's wrapping removed: `<module path>.lora_A.weight`.

    lorakit: `model.layers.0.self_attn.q_proj.lora_A.default.weight`;
    PEFT:    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`.
    """
    return param_name.removeprefix("base_model.model.").replace(".default.weight", ".weight")


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's A and B matrices by `adapter_key`, detached copies on the CPU."""
    return {adapter_key(name): param.detach().cpu().clone()
            for name, param in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def copy_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Overwrite the model's A and B with `tensors` (from `adapter_tensors`); every key must match once."""
    own = {adapter_key(name): param for name, param in model.named_parameters()
           if ".lora_A." in name or ".lora_B." in name}
    if set(own) != set(tensors):
        missing, extra = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
        raise ValueError(f"adapter keys differ: {len(missing)} not in model (e.g. {missing[:2]}), "
                         f"{len(extra)} not in the file (e.g. {extra[:2]})")
    with torch.no_grad():
        for key, param in own.items():
            if param.shape != tensors[key].shape:
                raise ValueError(f"{key}: shape {tuple(param.shape)} in the model, "
                                 f"{tuple(tensors[key].shape)} given")
            param.copy_(tensors[key])
    return len(own)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# ---- memory --------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def mapped_weights_rss() -> int:
    """Resident bytes of memory-mapped .safetensors files: transformers maps the weights file and the
    model's tensors are views of it, so the weights only become resident as they are first read."""
    import psutil

    return sum(int(m.rss) for m in psutil.Process().memory_maps() if m.path.endswith(".safetensors"))


def touch(module: nn.Module) -> None:
    """Read every parameter and buffer once, so memory-mapped weights are resident from here on."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.sum()


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each shared (tied) tensor counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


# ---- timing --------------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Any, device: str = "cpu") -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def parse_with_threads(parser: Any) -> Any:
    """Add `--threads` and `--json` to a benchmark's parser, parse, and apply `--threads`.

    `--threads N` sets torch's thread count (1 is steadier on a shared machine); `--json FILE`
    asks the benchmark to write its figures there too.
    """
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ---- child processes -----------------------------------------------------------------------------

def emit(result: dict[str, Any]) -> None:
    """The child's answer: one JSON line the parent finds by its prefix."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(module: str, args: Sequence[str], timeout: float = 1800.0,
              extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m module args` from the repository root and return its RESULT line as a dict."""
    command = [sys.executable, "-m", module, *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-3000:]
        raise RuntimeError(f"`{' '.join(command[1:])}` failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def run_text(module: str, args: Sequence[str], timeout: float = 1800.0) -> str:
    """Run `python -m module args` and return its standard output (for benchmarks that print tables)."""
    command = [sys.executable, "-m", module, *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[1:])}` failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return done.stdout


# ---- the machine ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    except OSError:
        pass
    return []


def machine() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": psutil.virtual_memory().total,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    import peft
    import transformers

    import lorakit

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "lorakit": lorakit.__version__}


def default_tokenizer() -> Any:
    """The default model's tokenizer (from lorakit's cache folder; nothing is downloaded)."""
    from transformers import AutoTokenizer

    from lorakit.hf.loading import resolve_spec

    return AutoTokenizer.from_pretrained(resolve_spec("default"), local_files_only=True)
