"""DistributedConfig: how a run spreads over processes (the YAML `distributed:` section)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lorakit.core.checks import is_positive_int

STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistributedConfig:
    """Several processes training one adapter; torchrun starts them (or `nproc` asks lorakit to).

    YAML: ``distributed: {strategy: fsdp, nproc: 2}``; flags: ``--distributed fsdp --nproc 2``.
    """

    strategy: str = "ddp"
    """ddp or fsdp. ddp: every rank holds the whole model, adapter gradients are summed over the ranks.
    fsdp: FSDP2 (`fully_shard`) also shards the frozen base, so each rank holds about 1/N of it."""
    nproc: int | None = None
    """Processes to start on this machine: `lorakit train` re-launches itself under torchrun.
    None: torchrun (or another launcher) has started the ranks already."""
    backend: str = "auto"
    """Collective backend: auto (NCCL on CUDA, gloo on CPU), gloo or nccl."""
    timeout_s: int = DEFAULT_TIMEOUT_S
    """Seconds a collective waits for the other ranks before the job ends with an error."""

    def __post_init__(self) -> None:
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"distributed strategy must be one of {', '.join(STRATEGIES)}, "
                            f"got {self.strategy!r}")
        if self.nproc is not None and not is_positive_int(self.nproc):
            problems.append(f"nproc must be an integer >= 1 or None, got {self.nproc!r}")
        if self.backend not in BACKENDS:
            problems.append(f"distributed backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not is_positive_int(self.timeout_s):
            problems.append(f"distributed timeout_s must be an integer >= 1, got {self.timeout_s!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistributedConfig:
        """From the YAML section; unknown keys are an error that lists the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown distributed setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(known)}")
        return cls(**values)
