"""TrainConfig: every setting of a fine-tuning run, validated once; the CLI and YAML map onto it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, get_args, get_type_hints

from lorakit.core.checks import is_finite_real, is_non_negative_int, is_positive_int
from lorakit.core.config import LoraConfig, parse_targets
from lorakit.train.distributed_config import DistributedConfig

QUANT_METHODS = ("nf4",)
OPTIMIZERS = ("adamw", "paged_adamw")
DATA_FORMATS = ("auto", "chat", "alpaca", "completion", "text")


@dataclass(frozen=True)
class TrainConfig:
    """A LoRA fine-tuning run: model, data, adapter, optimisation, and what gets written."""

    data: str
    """Training JSONL file (chat, alpaca, completion or text records)."""
    model: str = "default"
    """Base model: "default", a .gguf file or a transformers folder."""
    output_dir: str = "runs/lorakit"
    """Where the adapter, checkpoints, metrics.jsonl and loss.png go."""
    val_data: str | None = None
    """Validation JSONL; without it `val_fraction` of the training records is held out."""
    val_fraction: float = 0.0
    """Share of the training records held out for validation when no `val_data` is given."""
    format: str = "auto"
    """Record format: auto, chat, alpaca, completion or text."""
    skip_bad_lines: bool = False
    """Skip (and count) malformed lines instead of stopping at the first."""
    max_length: int = 512
    """Longest example in tokens; longer ones are truncated, those left without answer dropped."""
    pack: bool = False
    """Pack several examples per row (they never attend to each other)."""
    train_on_prompt: bool = False
    """Compute the loss on prompt tokens too, not only on the answers."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32
    """LoRA alpha (scale alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    targets: str | tuple[str, ...] = "all-linear"
    """Modules to adapt: "all-linear", a regex, or module-name suffixes, as a list or comma-separated
    (q_proj,v_proj)."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(r)."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output row (LoraConfig.use_dora; linear targets only)."""
    init: str = "kaiming"
    """Adapter initialisation (LoraConfig.init): kaiming, gaussian, pissa, pissa_niter_N (e.g. pissa_niter_4)
    or olora."""
    share_dropout_mask: bool = True
    """With dropout: modules reading one input (q, k, v; gate, up) share one mask (LoraConfig's field)."""
    quantize: str | None = None
    """Store the frozen base in 4-bit: "nf4" (QLoRA), or None."""
    learning_rate: float = 2e-4
    """Peak learning rate, reached after warm-up, then cosine decay to `min_lr_ratio` of it."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a share of the peak."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    loraplus_ratio: float | None = None
    """LoRA+: B's learning rate is this times A's (the paper suggests 16); None trains both at one rate
    (train/optimizer.py has the groups)."""
    loraplus_lr_embedding: float = 1e-6
    """LoRA+: the learning rate of embedding adapters (A and B), as PEFT's create_loraplus_optimizer."""
    optimizer: str = "adamw"
    """adamw, or paged_adamw (bitsandbytes, CUDA only)."""
    epochs: int = 1
    """Passes over the data (ignored when `max_steps` is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    batch_size: int = 4
    """Rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    global_batch_size: int | None = None
    """Rows per optimizer step over all ranks; when set, the micro-batches per step follow from it
    (global_batch_size / (batch_size x ranks), which must be whole), so one setting gives the same
    maths on 1, 2 or 8 processes. None: batch_size x grad_accum x ranks."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; None disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    seed: int = 0
    """Seeds adapter init, dropout and data order."""
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end)."""
    eval_exact_match: int = 0
    """At the end, greedy-generate answers for up to N validation records and report exact match."""
    max_new_tokens: int = 64
    """Generation length for exact match."""
    save_every: int = 0
    """Checkpoint every N steps (0: no intermediate checkpoints)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    resume: bool = False
    """Continue the run in `output_dir` from its newest checkpoint; its settings must match this run's."""
    overwrite: bool = False
    """Delete the previous run in `output_dir` first (adapter/, checkpoints, metrics.jsonl, loss.png,
    run.json); other files in the folder stay. Without it (or `resume`) a used folder is refused."""
    dtype: str | None = None
    """Weight dtype: float32, bfloat16 or float16; unset (None): float32 on CPU, bfloat16 on CUDA."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    progress: bool = True
    """Show the progress bar."""
    distributed: DistributedConfig | None = None
    """Several processes (DDP or FSDP2 under torchrun); the YAML `distributed:` section. None: one process."""

    def __post_init__(self) -> None:
        problems = _kind_problems(self)
        if _is_targets(self.targets):
            object.__setattr__(self, "targets", parse_targets(self.targets))
        if isinstance(self.distributed, dict):  # a YAML section or to_dict()'s form
            object.__setattr__(self, "distributed", DistributedConfig.from_dict(self.distributed))
        positive = ("max_length", "r", "batch_size", "grad_accum", "epochs", "keep_last", "max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if not is_positive_int(value):
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "eval_exact_match", "seed"):
            value = getattr(self, name)
            if not is_non_negative_int(value):
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        if self.global_batch_size is not None:
            if not is_positive_int(self.global_batch_size):
                problems.append(f"global_batch_size must be an integer >= 1 or None, "
                                f"got {self.global_batch_size!r}")
            elif self.grad_accum != 1:
                problems.append(f"give global_batch_size ({self.global_batch_size}) or grad_accum "
                                f"({self.grad_accum}), not both: the micro-batches per step follow from the "
                                "first")
        if self.distributed is not None and not isinstance(self.distributed, DistributedConfig):
            problems.append(f"distributed must be a mapping such as {{strategy: ddp, nproc: 2}}, got "
                            f"{self.distributed!r}")
        if self.max_steps is not None and not is_positive_int(self.max_steps):
            problems.append(f"max_steps must be an integer >= 1 or None, got {self.max_steps!r}")
        # Finite numbers first: YAML can give any type, and an infinite learning rate or decay makes NaN
        # weights.
        if not (is_finite_real(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if not (is_finite_real(self.val_fraction) and 0 <= self.val_fraction < 1):
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not (is_finite_real(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_grad_norm is not None and not (is_finite_real(self.max_grad_norm)
                                                   and self.max_grad_norm > 0):
            problems.append(f"max_grad_norm must be a finite number > 0 or None (no clipping), got "
                            f"{self.max_grad_norm!r}")
        if self.quantize is not None and self.quantize not in QUANT_METHODS:
            problems.append(f"quantize must be one of {', '.join(QUANT_METHODS)} or None, "
                            f"got {self.quantize!r}")
        if self.format not in DATA_FORMATS:
            problems.append(f"format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.loraplus_ratio is not None and not (is_finite_real(self.loraplus_ratio)
                                                    and self.loraplus_ratio > 0):
            problems.append(f"loraplus_ratio must be a number > 0 (B's learning rate = ratio x A's; LoRA+ "
                            f"suggests 16) or None, got {self.loraplus_ratio!r}")
        if not (is_finite_real(self.loraplus_lr_embedding) and self.loraplus_lr_embedding > 0):
            problems.append(f"loraplus_lr_embedding must be a number > 0, got {self.loraplus_lr_embedding!r}")
        if not (is_finite_real(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.eval_exact_match and not (self.val_data or self.val_fraction):
            problems.append(f"eval_exact_match={self.eval_exact_match} needs validation records: "
                            "give val_data (--val-data) or val_fraction (--val-fraction)")
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            problems.append(f"output_dir must name a folder, got {self.output_dir!r}")
        if self.resume and self.overwrite:
            problems.append("resume and overwrite contradict each other: resume continues the run in "
                            "output_dir, overwrite deletes it")
        if not problems:  # the adapter's own settings, checked by the class that owns them
            try:
                self.lora_config()
            except ValueError as err:  # "invalid LoraConfig:\n  problem\n  problem"
                problems += [line.strip() for line in str(err).splitlines()[1:]] or [str(err)]
        if len(problems) == 1:
            raise ValueError(f"invalid training setting: {problems[0]}")
        if problems:
            raise ValueError("invalid training settings:\n  " + "\n  ".join(problems))

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on `world_size` ranks.

        Raises:
            ValueError: global_batch_size does not split into whole micro-batches over the ranks.
        """
        if self.global_batch_size is None:
            return self.grad_accum
        per_step = self.batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size={self.global_batch_size} does not split over {world_size} "
                             f"rank(s) x batch_size {self.batch_size}: give a multiple of {per_step}, "
                             "or change batch_size")
        return self.global_batch_size // per_step

    def global_batch(self, world_size: int) -> int:
        """Rows per optimizer step over all ranks."""
        return self.batch_size * self.accumulation(world_size) * world_size

    def lora_config(self) -> LoraConfig:
        """The adapter this run trains."""
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                          use_rslora=self.use_rslora, share_dropout_mask=self.share_dropout_mask,
                          use_dora=self.use_dora, init=self.init,
                          # --quantize with --init pissa asks for both
                          allow_requantize=self.quantize is not None)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (a YAML file's keys); unknown keys are an error that lists the known ones.

        Numbers written as text are read as numbers: PyYAML reads `2e-4` (no dot) as a string.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        types = get_type_hints(cls)
        return cls(**{key: value if key == "distributed" else _as_number(key, value, types[key])
                      for key, value in values.items()})

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if isinstance(values["targets"], tuple):
            values["targets"] = list(values["targets"])
        return values


# Text fields (output_dir has its own check) with what they accept, and on/off switches: YAML can
# give any type for them.
_TEXT_FIELDS = {"data": "a JSONL file's path", "model": "default, a .gguf file or a transformers folder",
                "val_data": "a JSONL file's path or null", "dtype": "float32, bfloat16, float16 or null",
                "device": "auto, cpu, cuda or cuda:N"}
_SWITCHES = ("skip_bad_lines", "pack", "train_on_prompt", "use_rslora", "use_dora", "share_dropout_mask",
             "gradient_checkpointing", "resume", "overwrite", "progress")


def _kind_problems(config: TrainConfig) -> list[str]:
    """Text where text belongs and True/False for switches: a quoted 'no' would otherwise count as on."""
    problems = []
    for name, accepted in _TEXT_FIELDS.items():
        value = getattr(config, name)
        if not isinstance(value, str) and not (value is None and name in ("val_data", "dtype")):
            problems.append(f"{name} must be text ({accepted}), got {value!r}")
    for name in _SWITCHES:
        value = getattr(config, name)
        if not isinstance(value, bool):
            problems.append(f"{name} must be true or false, got {value!r}")
    if not _is_targets(config.targets):
        problems.append(f"targets must be all-linear, a regular expression or a list of module names, "
                        f"got {config.targets!r}")
    return problems


def _is_targets(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, list | tuple)
                                      and all(isinstance(v, str) for v in value))


def _as_number(key: str, value: Any, kind: Any) -> Any:
    """`value` as the int or float that field `key` takes, when it is text; anything else unchanged."""
    accepted = set(get_args(kind)) or {kind}
    numeric = [t for t in (int, float) if t in accepted]
    if not isinstance(value, str) or not numeric or str in accepted:
        return value
    for number in numeric:
        try:
            return number(value.strip().replace("_", ""))
        except ValueError:
            continue
    raise ValueError(f"{key} must be {'an integer' if numeric == [int] else 'a number'}, got {value!r}")
