"""Several processes, one run: DDP and FSDP2 on gloo give one process's adapter, and resume across world sizes.

Real ranks: spawned processes with torchrun's variables set, joined by a gloo process
group. Each launch runs several short trainings, because starting the ranks costs more than training.
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing as mp
import shutil
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit.train import TrainConfig, train
from lorakit.train.distributed import OtherRankFailed
from tests.train.helpers import tiny_model_and_tokenizer, write_data
from tests.train.test_train_loop import config, final_adapter

WORLD = 2
HANG_S = 90


def model64() -> tuple[Any, Any]:
    model, tokenizer = tiny_model_and_tokenizer()
    return model.double(), tokenizer


def settings(tmp_path: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """float64, no dropout, 4 steps of 8 rows (one process: 4 rows x 2 micro-batches), clipping on."""
    values: dict[str, Any] = dict(output_dir=str(tmp_path / name), dropout=0.0, max_steps=4, batch_size=4,
                                  grad_accum=2, max_grad_norm=0.05, learning_rate=2e-2, warmup_steps=0,
                                  min_lr_ratio=1.0, save_every=2, max_length=32)
    values.update(overrides)
    return config(tmp_path, write_data(tmp_path), **values).to_dict()


def _rank_main(rank: int, port: int, jobs: list[dict[str, Any]], results: Any) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(HANG_S, exit=True)  # a hung rank shows where, then ends
    outcome = []
    try:
        for job in jobs:
            if callable(job):  # a measurement of its own (a module-level function: spawn pickles it by name)
                outcome.append(job(rank))
                continue
            values = job[rank] if isinstance(job, list) else job
            try:
                # NF4 takes 16/32-bit inputs: a QLoRA job trains in float32.
                train(TrainConfig(**values), *(tiny_model_and_tokenizer() if values["quantize"] else model64()))
                outcome.append("ok")
            except (ValueError, OtherRankFailed) as err:
                outcome.append(f"{type(err).__name__}: {err}")
        results.put((rank, outcome))
    except BaseException:
        results.put((rank, ["crash: " + traceback.format_exc()]))


def nf4_shards(rank: int) -> str:
    """QLoRA's tiny model under FSDP2 on this rank: the bytes of the NF4 tensors and of the whole frozen base
    it holds, and whether its loss and adapter gradients are bit-equal to the unsharded model's in this process."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from lorakit.core.config import LoraConfig
    from lorakit.core.inject import add_adapter
    from lorakit.quant import NF4Linear, quantize_model
    from lorakit.train.distributed import World
    from lorakit.train.parallel import TrainingModule, base_bytes, full_tensor, wrap

    if not dist.is_initialized():
        dist.init_process_group("gloo")
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
    same = torch.equal(losses[0], losses[1]) and all(torch.equal(grads[0][n], WORLD * grads[1][n]) for n in grads[1])
    local, total = base_bytes(models[0])
    return f"nf4 {nf4_local} {nf4_whole} base {local} {total} bit-equal {same}"


def run_ranks(jobs: list[Any]) -> list[list[str]]:
    """Run `jobs` one after another on WORLD spawned ranks: TrainConfig dicts (or per-rank lists of them),
    or functions of the rank that return a line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # spawn, not fork: a fork of this (threaded) test process can hang in its thread pools.
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank_main, args=(rank, port, jobs, results)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    try:
        outcomes = dict(results.get(timeout=HANG_S + 30) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():  # a hung rank must not outlive the test
                process.kill()
    for rank, outcome in outcomes.items():
        assert not any(o.startswith("crash") for o in outcome), f"rank {rank}: {outcome}"
    return [outcomes[rank] for rank in range(WORLD)]


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


def cut_at_checkpoint_2(source: Path, folder: Path) -> Path:
    """A copy of a finished run with everything after checkpoint-2 dropped, as kill -9 there would leave it."""
    shutil.copytree(source, folder)
    for stale in ("checkpoint-4", "adapter", "loss.png"):
        shutil.rmtree(folder / stale, ignore_errors=True)
        (folder / stale).unlink(missing_ok=True)
    return folder


def resume_on_one_process(tmp_path: Path, source: str, name: str, **overrides: Any) -> Path:
    """Cut a finished run at checkpoint-2 and resume it in this one process."""
    folder = cut_at_checkpoint_2(tmp_path / source, tmp_path / name)
    values = {**settings(tmp_path, name, resume=True, distributed=None), **overrides}
    train(TrainConfig(**values), *model64())
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process: 4 steps of 8 rows, with and without gradient checkpointing."""
    tmp_path = tmp_path_factory.mktemp("one")
    train(TrainConfig(**settings(tmp_path, "single")), *model64())
    train(TrainConfig(**settings(tmp_path, "single_gc", gradient_checkpointing=True)), *model64())
    train(TrainConfig(**settings(tmp_path, "single_qlora", quantize="nf4")), *tiny_model_and_tokenizer())
    return tmp_path


def test_ddp_equals_one_process_and_resumes_on_one(reference, tmp_path, capfd):
    ddp = {"strategy": "ddp"}
    # 2 ranks x 2 rows x 2 micro-batches = 8 rows per step, as the reference.
    jobs: list[Any] = [
        settings(tmp_path, "ddp", batch_size=2, distributed=ddp),
        settings(tmp_path, "ddp_gc", batch_size=2, distributed=ddp, gradient_checkpointing=True),
        settings(tmp_path, "ddp_global", batch_size=2, grad_accum=1, global_batch_size=8, distributed=ddp),
        [settings(tmp_path, "mixed", batch_size=2, distributed=ddp, seed=rank) for rank in range(WORLD)],
        settings(tmp_path, "odd", batch_size=3, grad_accum=1, global_batch_size=8, distributed=ddp),
        settings(tmp_path, "ddp_qlora", batch_size=2, distributed=ddp, quantize="nf4"),
    ]
    outcomes = run_ranks(jobs)
    for rank, outcome in enumerate(outcomes):
        assert outcome[:3] == ["ok", "ok", "ok"] and outcome[5] == "ok", outcome
        assert f"rank {1 - rank} has seed={1 - rank} (rank 0: 0)" in outcome[3] or "rank 1 has seed=1" in outcome[3]
        assert "global_batch_size=8 does not split over 2 rank(s) x batch_size 3" in outcome[4]
    printed = capfd.readouterr().out
    assert "ddp on 2 ranks (cpu): 2 rows x 2 micro-batch(es) x 2 ranks = 8 rows per step" in printed

    single = final_adapter(reference / "single")
    assert_same_steps(tmp_path / "ddp", reference / "single")
    assert_close_adapters(final_adapter(tmp_path / "ddp"), single)
    assert_close_adapters(final_adapter(tmp_path / "ddp_global"), single)
    assert_close_adapters(final_adapter(tmp_path / "ddp_gc"), final_adapter(reference / "single_gc"))
    assert_close_qlora(final_adapter(tmp_path / "ddp_qlora"), final_adapter(reference / "single_qlora"))
    # Only rank 0 wrote: the run's files, once.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "adapter", "checkpoint-2", "checkpoint-4", "loss.png", "metrics.jsonl", "run.json"]

    # Checkpointed on 2 ranks, resumed on 1 with the same global batch (4 rows x 2): the same adapter.
    resumed = resume_on_one_process(tmp_path, "ddp", "ddp_resumed")
    assert_close_adapters(final_adapter(resumed), single)
    with pytest.raises(ValueError, match="checkpoint-2 has global_batch=8, this run asks global_batch=4"):
        resume_on_one_process(tmp_path, "ddp", "ddp_other_batch", grad_accum=1)


def test_fsdp2_equals_one_process_shards_the_base_and_resumes_on_one(reference, tmp_path, capfd):
    fsdp = {"strategy": "fsdp"}
    # Checkpointed by one process, resumed on 2 ranks: rank 0 reads the whole tensors, each rank keeps its shard.
    cut_at_checkpoint_2(reference / "single", tmp_path / "fsdp_from_one")
    outcomes = run_ranks([settings(tmp_path, "fsdp", batch_size=2, distributed=fsdp),
                          settings(tmp_path, "fsdp_gc", batch_size=2, distributed=fsdp, gradient_checkpointing=True),
                          settings(tmp_path, "fsdp_qlora", batch_size=2, distributed=fsdp, quantize="nf4"),
                          nf4_shards,
                          # (the reference's data file: resume checks that the data is the same)
                          settings(reference, "fsdp_from_one", batch_size=2, distributed=fsdp, resume=True,
                                   output_dir=str(tmp_path / "fsdp_from_one"))])
    assert [outcome[:3] + outcome[4:] for outcome in outcomes] == [["ok"] * 4, ["ok"] * 4]
    printed = capfd.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("base weights per rank:")]
    assert len(lines) == 4  # rank 0 alone prints, once per run (float64, gradient checkpointing, QLoRA, resumed)
    for line in lines:
        local, whole = (int(x.replace(",", "")) for x in line.split("; ")[1].split()[0:3:2])
        assert 0.45 * whole < local < 0.55 * whole, line  # about half of the base on each of 2 ranks
    # Each rank holds about half of the NF4 codes and scales (measured from its local shards), and the
    # sharded model computes the unsharded model's loss and adapter gradients bit for bit.
    nf4_whole = None
    for outcome in outcomes:
        fields = outcome[3].split()
        local, whole, base_local, base_whole = (int(fields[i]) for i in (1, 2, 4, 5))
        assert 0.45 * whole < local < 0.55 * whole and 0.45 * base_whole < base_local < 0.55 * base_whole, outcome
        assert nf4_whole in (None, whole) and fields[-1] == "True", outcome
        nf4_whole = whole

    single = final_adapter(reference / "single")
    assert_same_steps(tmp_path / "fsdp", reference / "single")
    assert_close_adapters(final_adapter(tmp_path / "fsdp"), single)
    assert_close_adapters(final_adapter(tmp_path / "fsdp_gc"), final_adapter(reference / "single_gc"))
    # QLoRA under FSDP2, the NF4 codes and scales sharded.
    assert_close_qlora(final_adapter(tmp_path / "fsdp_qlora"), final_adapter(reference / "single_qlora"))
    # The checkpoint holds whole tensors: one process continues from it, and 2 ranks from one process's.
    assert_close_adapters(final_adapter(resume_on_one_process(tmp_path, "fsdp", "fsdp_resumed")), single)
    assert_close_adapters(final_adapter(tmp_path / "fsdp_from_one"), single)
    assert_same_steps(tmp_path / "fsdp_from_one", reference / "single")  # metrics.jsonl continued, not restarted


def test_fsdp_without_several_processes_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--distributed fsdp needs several processes: pass --nproc N"):
        train(TrainConfig(**settings(tmp_path, "alone", distributed={"strategy": "fsdp"})), *model64())
    assert not (tmp_path / "alone").exists()


def test_nccl_on_a_cpu_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    values = settings(tmp_path, "nccl", device="cpu", distributed={"backend": "nccl"})
    with pytest.raises(ValueError, match="backend 'nccl' needs CUDA GPUs, and this run's device is cpu"):
        train(TrainConfig(**values), *model64())


def test_a_global_batch_that_does_not_split_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="global_batch_size=6 does not split over 1 rank.* multiple of 4"):
        train(TrainConfig(**settings(tmp_path, "odd", grad_accum=1, global_batch_size=6)), *model64())
    with pytest.raises(ValueError, match="give global_batch_size .* or grad_accum .*, not both"):
        TrainConfig(**settings(tmp_path, "both", global_batch_size=8))
