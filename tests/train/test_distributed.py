"""Several processes, one run: DDP and FSDP2 on gloo give one process's adapter, and resume across world
sizes.

Real ranks (tests/train/ranks.py): forked processes with torchrun's variables set, joined by a gloo
process group. Starting ranks costs more than training the tiny model, so one start of 2 ranks runs
every 2-rank job of this file (the one-process references too, two side by side), and one start of
4 ranks resumes two of its runs; the tests then read what the runs wrote and printed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit.train import TrainConfig, train
from tests.train.helpers import tiny_model_and_tokenizer, write_data
from tests.train.ranks import Alone, Outcome, Together, run_ranks
from tests.train.test_train_loop import config, final_adapter

WORLD = 2
DDP, FSDP = {"strategy": "ddp"}, {"strategy": "fsdp"}


def settings(tmp_path: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """float64, no dropout, 4 steps of 8 rows (one process: 4 rows x 2 micro-batches), clipping on,
    checkpoints at steps 2 and 4."""
    values: dict[str, Any] = dict(output_dir=str(tmp_path / name), dropout=0.0, max_steps=4, batch_size=4,
                                  grad_accum=2, max_grad_norm=0.05, learning_rate=2e-2, warmup_steps=0,
                                  min_lr_ratio=1.0, save_every=2, max_length=32)
    values.update(overrides)
    return config(tmp_path, write_data(tmp_path), **values).to_dict()


def cut_at_checkpoint_2(source: Path, folder: Path) -> Path:
    """A copy of a finished run with everything after checkpoint-2 dropped, as kill -9 there would
    leave it."""
    shutil.copytree(source, folder)
    for stale in ("checkpoint-4", "adapter", "loss.png"):
        shutil.rmtree(folder / stale, ignore_errors=True)
        (folder / stale).unlink(missing_ok=True)
    return folder


def on_rank_0(work: Callable[[], Any], rank: int) -> str:
    """A job: rank 0 does `work`; every rank waits until it has."""
    import torch.distributed as dist

    if rank == 0:
        work()
    dist.barrier()
    return "done"


def cut_runs(cuts: list[tuple[Path, Path]]) -> None:
    for source, folder in cuts:
        cut_at_checkpoint_2(source, folder)


def save_tiny_model(folder: Path) -> None:
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def train_command(argv: list[str], rank: int) -> str:
    """A job: `lorakit train ...` on this rank, as torchrun would start it (`-m lorakit train ...`)."""
    from lorakit.cli.main import main

    return f"exit {main(argv)}"


def nf4_shards(rank: int) -> str:
    """QLoRA's tiny model under FSDP2 on this rank: the bytes of the NF4 tensors and of the whole frozen base
    it holds, and whether its loss and adapter gradients are bit-equal to the unsharded model's in this
    process."""
    from torch.distributed.tensor import DTensor

    from lorakit.core.config import LoraConfig
    from lorakit.core.inject import add_adapter
    from lorakit.quant import NF4Linear, quantize_model
    from lorakit.train.distributed import World
    from lorakit.train.parallel import TrainingModule, base_bytes, full_tensor, wrap

    models = []
    for _ in range(2):  # one to shard, one to stay whole as the reference
        model, tokenizer = tiny_model_and_tokenizer()
        quantize_model(model)
        add_adapter(model, LoraConfig(r=2, targets=("q_proj", "v_proj", "down_proj")))
        with torch.no_grad():  # B = 0 would leave the gradient of A at 0: give B values
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
        models.append(model)
    sharded = wrap(models[0], World(rank=rank, world_size=WORLD, strategy="fsdp"))
    whole = TrainingModule(models[1])
    nf4 = [t for m in models[0].modules() if isinstance(m, NF4Linear)
           for t in [*m.parameters(), *m.buffers()] if t is not m.bias]
    nf4_local = sum((t.to_local() if isinstance(t, DTensor) else t).untyped_storage().nbytes() for t in nf4)
    nf4_whole = sum(t.numel() * t.element_size() for t in nf4)
    assert nf4 and all(isinstance(t, DTensor) for t in nf4 if t.dim() > 0)
    ids = tokenizer(["Question: one two? Answer: two one", "Question: three?"], return_tensors="pt",
                    padding=True)
    inputs = {"input_ids": ids.input_ids, "attention_mask": ids.attention_mask, "labels": ids.input_ids}
    losses, grads = [], []
    for unit, model in ((sharded, models[0]), (whole, models[1])):
        loss = unit(inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: full_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad})
    # Both ranks fed the same rows and the gradients are summed over the ranks (parallel.py): WORLD times
    # one process's, exactly (a power of two).
    same = (torch.equal(losses[0], losses[1])
            and all(torch.equal(grads[0][n], WORLD * grads[1][n]) for n in grads[1]))
    local, total = base_bytes(models[0])
    return f"nf4 {nf4_local} {nf4_whole} base {local} {total} bit-equal {same}"


@dataclass(frozen=True)
class Runs:
    folder: Path
    outcomes: dict[str, list[Outcome]]
    """Job name -> its outcome on each rank."""
    distributed: tuple[str, ...]
    """The jobs that ran on all ranks together."""

    def status(self, job: str) -> list[str]:
        return [outcome.status for outcome in self.outcomes[job]]

    def adapter(self, run: str) -> dict[str, torch.Tensor]:
        return final_adapter(self.folder / run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    folder = tmp_path_factory.mktemp("ranks")
    run = partial(settings, folder)

    def resumed(name: str, **overrides: Any) -> dict[str, Any]:
        return run(name, resume=True, **overrides)

    # Each 2-rank run: 2 ranks x 2 rows x 2 micro-batches = 8 rows per step, as the references.
    on_two: dict[str, Any] = {
        "references": Alone([run("single"), run("single_qlora", quantize="nf4")]),
        "dora reference": Alone([None, run("single_dora", use_dora=True)]),
        "ddp": Together(run("ddp", batch_size=2, grad_accum=1, global_batch_size=8, distributed=DDP),
                        plot=True),
        "ddp_gc": Together(run("ddp_gc", batch_size=2, distributed=DDP, gradient_checkpointing=True)),
        "ddp_qlora": Together(run("ddp_qlora", batch_size=2, distributed=DDP, quantize="nf4")),
        "ddp_dora": Together(run("ddp_dora", batch_size=2, distributed=DDP, use_dora=True)),
        "mixed": Together([run("mixed", batch_size=2, distributed=DDP, seed=rank) for rank in range(WORLD)]),
        "odd": Together(run("odd", batch_size=3, grad_accum=1, global_batch_size=8, distributed=DDP)),
        "fsdp": Together(run("fsdp", batch_size=2, distributed=FSDP)),
        "fsdp_gc": Together(run("fsdp_gc", batch_size=2, distributed=FSDP, gradient_checkpointing=True)),
        "fsdp_qlora": Together(run("fsdp_qlora", batch_size=2, distributed=FSDP, quantize="nf4")),
        "fsdp_dora": Together(run("fsdp_dora", batch_size=2, distributed=FSDP, use_dora=True)),
        "nf4_shards": nf4_shards,
        "cut": partial(on_rank_0, partial(cut_runs, [(folder / source, folder / cut) for source, cut in (
            ("single", "fsdp_from_one"), ("ddp", "ddp_on_one"), ("fsdp", "fsdp_on_one"),
            ("ddp", "ddp_other_batch"), ("ddp", "ddp_on_four"), ("fsdp", "fsdp_on_four"))])),
        # Checkpointed by one process, resumed on 2 ranks: rank 0 reads the whole tensors, each rank keeps
        # its shard.
        "fsdp_from_one": Together(resumed("fsdp_from_one", batch_size=2, distributed=FSDP)),
        # Checkpointed on 2 ranks, resumed by one process (4 rows x 2 micro-batches), two side by side.
        "on_one": Alone([resumed("ddp_on_one", distributed=None), resumed("fsdp_on_one", distributed=None)]),
        "other_batch": Alone([resumed("ddp_other_batch", distributed=None, grad_accum=1), None]),
        # The command each rank runs under `lorakit train --nproc 2` (test_distributed_cli starts that for
        # real).
        "model folder": partial(on_rank_0, partial(save_tiny_model, folder / "tiny-model")),
        "command": partial(train_command, [
            "train", "--model", str(folder / "tiny-model"), "--data", str(folder / "train.jsonl"),
            "--output-dir", str(folder / "command"), "--max-steps", "2", "--r", "2", "--batch-size", "2",
            "--global-batch-size", "8", "--max-length", "32", "--save-every", "2", "--no-progress",
            "--distributed", "ddp"]),
    }
    # Checkpointed on 2 ranks, resumed on 4: 4 ranks x 1 row x 2 micro-batches.
    on_four: dict[str, Any] = {
        name: Together(resumed(name, batch_size=1, grad_accum=1, global_batch_size=8, distributed=strategy))
        for name, strategy in (("ddp_on_four", DDP), ("fsdp_on_four", FSDP))}
    outcomes: dict[str, list[Outcome]] = {}
    for world, jobs in ((WORLD, on_two), (4, on_four)):
        by_rank = run_ranks(world, list(jobs.values()))
        outcomes.update({name: [by_rank[rank][index] for rank in range(world)]
                         for index, name in enumerate(jobs)})
    together = tuple(name for jobs in (on_two, on_four) for name, job in jobs.items()
                     if isinstance(job, Together))
    return Runs(folder, outcomes, together)


def assert_close_adapters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def assert_close_qlora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """NF4 takes 16/32-bit inputs, so a QLoRA run trains in float32: float32's tolerance."""
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)


def assert_same_steps(run: Path, reference: Path) -> None:
    """The same loss and gradient norm before clipping at every step.

    AdamW hardly sees a gradient scaled by a constant (it divides by its running RMS), so the
    adapters alone would not catch gradients averaged where they should be summed; the norms do.
    """
    def steps(folder: Path) -> list[tuple[float, float]]:
        events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(e["loss"], e["grad_norm"]) for e in events if e["kind"] == "train"]

    ours, theirs = steps(run), steps(reference)
    assert len(ours) == len(theirs) == 4
    assert all(norm > 0.05 for _, norm in theirs)  # clipping was active at every step
    # The loss sums in float32 (chunked_loss.py), so agreement is to float32 precision.
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=0)


def test_ddp_equals_one_process(runs):
    assert runs.status("references") == ["ok", "ok"] and runs.status("dora reference") == ["sat out", "ok"]
    for job in ("ddp", "ddp_gc", "ddp_qlora", "ddp_dora"):
        assert runs.status(job) == ["ok", "ok"], job
    single = runs.adapter("single")
    # global_batch_size=8 on 2 ranks of 2 rows: 2 micro-batches, as grad_accum=2 gives ddp_gc.
    assert_same_steps(runs.folder / "ddp", runs.folder / "single")
    assert_close_adapters(runs.adapter("ddp"), single)
    # Gradient checkpointing recomputes the same float64 values: one process's adapter without it.
    assert_close_adapters(runs.adapter("ddp_gc"), single)
    assert_close_qlora(runs.adapter("ddp_qlora"), runs.adapter("single_qlora"))


def test_fsdp2_equals_one_process_and_shards_the_base(runs):
    for job in ("fsdp", "fsdp_gc", "fsdp_qlora"):
        assert runs.status(job) == ["ok", "ok"], job
    printed = "".join(runs.outcomes[job][0].printed
                      for job in ("fsdp", "fsdp_gc", "fsdp_qlora", "fsdp_from_one"))
    lines = [line for line in printed.splitlines() if line.startswith("base weights per rank:")]
    assert len(lines) == 4  # once per run (float64, gradient checkpointing, QLoRA, resumed)
    for line in lines:
        local, whole = (int(x.replace(",", "")) for x in line.split("; ")[1].split()[0:3:2])
        assert 0.45 * whole < local < 0.55 * whole, line  # about half of the base on each of 2 ranks
    # Each rank holds about half of the NF4 codes and scales (measured from its local shards), and the
    # sharded model computes the unsharded model's loss and adapter gradients bit for bit.
    nf4_whole = None
    for line in runs.status("nf4_shards"):
        fields = line.split()
        local, whole, base_local, base_whole = (int(fields[i]) for i in (1, 2, 4, 5))
        assert (0.45 * whole < local < 0.55 * whole
                and 0.45 * base_whole < base_local < 0.55 * base_whole), line
        assert nf4_whole in (None, whole) and fields[-1] == "True", line
        nf4_whole = whole

    single = runs.adapter("single")
    assert_same_steps(runs.folder / "fsdp", runs.folder / "single")
    assert_close_adapters(runs.adapter("fsdp"), single)
    assert_close_adapters(runs.adapter("fsdp_gc"), single)
    # QLoRA under FSDP2, the NF4 codes and scales sharded.
    assert_close_qlora(runs.adapter("fsdp_qlora"), runs.adapter("single_qlora"))


def test_dora_under_ddp_and_fsdp2_equals_one_process(runs):
    # DoRA's magnitude is one more trainable vector per layer; its norm needs the whole base weight,
    # which FSDP2 has gathered while the layer computes.
    assert runs.status("fsdp_dora") == ["ok", "ok"]
    single = runs.adapter("single_dora")
    assert any("lora_magnitude_vector" in key for key in single)
    for run in ("ddp_dora", "fsdp_dora"):
        assert_same_steps(runs.folder / run, runs.folder / "single_dora")
        assert_close_adapters(runs.adapter(run), single)


def test_rank_0_alone_prints_and_writes(runs):
    first, second = runs.outcomes["ddp"]
    assert "ddp on 2 ranks (cpu): 2 rows x 2 micro-batch(es) x 2 ranks = 8 rows per step" in first.printed
    assert "trainable params" in first.printed and second.printed == ""
    assert sorted(p.name for p in (runs.folder / "ddp").iterdir()) == [
        "adapter", "checkpoint-2", "checkpoint-4", "loss.png", "metrics.jsonl", "run.json"]
    for job in runs.distributed:
        assert ([outcome.printed for outcome in runs.outcomes[job][1:]]
                == [""] * (len(runs.outcomes[job]) - 1)), job


def test_the_train_command_on_ranks_reports_once(runs):
    assert runs.status("command") == ["exit 0", "exit 0"]
    first, second = runs.outcomes["command"]
    assert "trained 2 steps" in first.printed and second.printed == ""
    assert (runs.folder / "command" / "adapter" / "adapter_model.safetensors").is_file()
    assert (runs.folder / "command" / "metrics.jsonl").read_text().count('"kind": "train"') == 2


def test_ranks_started_with_different_settings_or_a_batch_that_does_not_split_are_refused(runs):
    for status in runs.status("mixed"):
        assert "ranks started with different settings" in status and "rank 1 has seed=1 (rank 0: 0)" in status
    for status in runs.status("odd"):
        assert "global_batch_size=8 does not split over 2 rank(s) x batch_size 3" in status
    assert not (runs.folder / "mixed" / "adapter").exists()


def test_resume_across_world_sizes_continues_as_one_uninterrupted_process(runs):
    single = runs.folder / "single"
    # Checkpointed on 2 ranks (DDP, FSDP2), resumed on 1 and on 4 ranks; one process's checkpoint resumed
    # on 2 FSDP2 ranks: the same adapter, and the same losses and gradient norms at every step.
    assert runs.status("on_one") == ["ok", "ok"]
    for job in ("fsdp_from_one", "ddp_on_four", "fsdp_on_four"):
        assert runs.status(job) == ["ok"] * len(runs.outcomes[job]), job
    assert "ddp on 4 ranks (cpu): 1 rows x 2 micro-batch(es) x 4 ranks = 8 rows per step" in \
        runs.outcomes["ddp_on_four"][0].printed
    # rank 0 says where it went on from
    for job in ("on_one", "fsdp_from_one", "ddp_on_four", "fsdp_on_four"):
        assert "checkpoint-2 (step 2)" in runs.outcomes[job][0].printed, job
    for run in ("ddp_on_one", "fsdp_on_one", "fsdp_from_one", "ddp_on_four", "fsdp_on_four"):
        assert_same_steps(runs.folder / run, single)  # metrics.jsonl continued, not restarted
        assert_close_adapters(runs.adapter(run), runs.adapter("single"))
    refused = runs.status("other_batch")[0]  # another global batch would not continue the same run
    assert refused.startswith("ValueError: cannot resume the run in") and \
        "checkpoint-2 has global_batch=8, this run asks global_batch=4" in refused


def test_fsdp_without_several_processes_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--distributed fsdp needs several processes: pass --nproc N"):
        train(TrainConfig(**settings(tmp_path, "alone", distributed={"strategy": "fsdp"})))
    assert not (tmp_path / "alone").exists()


def test_nccl_on_a_cpu_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    values = settings(tmp_path, "nccl", device="cpu", distributed={"backend": "nccl"})
    with pytest.raises(ValueError, match="backend 'nccl' needs CUDA GPUs, and this run's device is cpu"):
        train(TrainConfig(**values))


def test_a_global_batch_that_does_not_split_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="global_batch_size=6 does not split over 1 rank.* multiple of 4"):
        train(TrainConfig(**settings(tmp_path, "odd", grad_accum=1, global_batch_size=6)))
    with pytest.raises(ValueError, match="give global_batch_size .* or grad_accum .*, not both"):
        TrainConfig(**settings(tmp_path, "both", global_batch_size=8))
