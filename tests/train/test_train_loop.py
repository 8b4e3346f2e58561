import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import TrainConfig, TrainingDiverged, train
from lorakit.train.checkpoint import list_checkpoints
from tests.train.helpers import tiny_model_and_tokenizer, write_data

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, data: Path, **overrides) -> TrainConfig:
    values = dict(data=str(data), output_dir=str(tmp_path / "run"), r=4, alpha=8, dropout=0.1, batch_size=4,
                  learning_rate=5e-3, max_steps=6, warmup_steps=2, seed=3, progress=False, max_length=64)
    values.update(overrides)
    return TrainConfig(**values)


def test_training_lowers_loss_and_writes_everything(tmp_path):
    data = write_data(tmp_path)
    model, tokenizer = tiny_model_and_tokenizer()
    result = train(config(tmp_path, data, max_steps=30, dropout=0.0, learning_rate=3e-2, val_fraction=0.25,
                          eval_every=10, eval_exact_match=3, max_new_tokens=4, grad_accum=2),
                   model, tokenizer)
    events = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    losses = [e["loss"] for e in events if e["kind"] == "train"]
    assert len(losses) == 30 and losses[-1] < losses[0] * 0.7
    assert [e["step"] for e in events if e["kind"] == "eval"] == [10, 20, 30]
    assert any(e["kind"] == "exact_match" for e in events) and result.exact_match is not None
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lrs = [e["lr"] for e in events if e["kind"] == "train"]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[5]  # warm-up, then decay


def test_checkpoints_keep_last_k(tmp_path):
    data = write_data(tmp_path)
    model, tokenizer = tiny_model_and_tokenizer()
    train(config(tmp_path, data, save_every=1, keep_last=2), model, tokenizer)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-5", "checkpoint-6"]
    assert not list((tmp_path / "run").glob(".tmp-*"))


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_after_crash_gives_the_same_adapter(tmp_path, monkeypatch):
    data = write_data(tmp_path)
    straight = config(tmp_path, data, output_dir=str(tmp_path / "straight"), save_every=2, grad_accum=2)
    train(straight, *tiny_model_and_tokenizer())

    import lorakit.train.loop as loop

    real_save = loop.save_checkpoint
    calls = {"n": 0}

    def crash_after_second_save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run dies right after writing checkpoint-4
        return path

    interrupted = config(tmp_path, data, output_dir=str(tmp_path / "interrupted"), save_every=2, grad_accum=2)
    monkeypatch.setattr(loop, "save_checkpoint", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, *tiny_model_and_tokenizer())
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    train(TrainConfig(**{**interrupted.to_dict(), "resume": True}), *tiny_model_and_tokenizer())
    assert_same_adapter(final_adapter(tmp_path / "interrupted"), final_adapter(tmp_path / "straight"))
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
import lorakit.train.loop as loop
from lorakit.train import TrainConfig, train
from tests.train.helpers import tiny_model_and_tokenizer

real_save = loop.save_checkpoint
def slow_save(*args, **kwargs):
    path = real_save(*args, **kwargs)
    print("saved", path, flush=True)
    time.sleep(0.4)  # leaves the parent time to kill us between steps
    return path
loop.save_checkpoint = slow_save
train(TrainConfig(**{values!r}), *tiny_model_and_tokenizer())
"""


def test_resume_after_kill_9_gives_the_same_adapter(tmp_path):
    data = write_data(tmp_path)
    straight = config(tmp_path, data, output_dir=str(tmp_path / "straight"), max_steps=8, save_every=2)
    train(straight, *tiny_model_and_tokenizer())

    killed = config(tmp_path, data, output_dir=str(tmp_path / "killed"), max_steps=8, save_every=2)
    script = KILL_SCRIPT.format(root=str(ROOT), values=killed.to_dict())
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout is not None
    for line in process.stdout:
        if "checkpoint-4" in line:
            time.sleep(0.2)
            process.send_signal(signal.SIGKILL)
            break
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter").exists()
    train(TrainConfig(**{**killed.to_dict(), "resume": True}), *tiny_model_and_tokenizer())
    assert_same_adapter(final_adapter(tmp_path / "killed"), final_adapter(tmp_path / "straight"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = write_data(tmp_path)
    model, tokenizer = tiny_model_and_tokenizer()
    run = config(tmp_path, data, learning_rate=1e20, max_grad_norm=None, save_every=1, warmup_steps=0,
                 max_steps=20, dropout=0.0)
    with pytest.raises(TrainingDiverged) as err:
        train(run, model, tokenizer)
    kept = list_checkpoints(tmp_path / "run")
    assert kept and str(kept[-1]) in str(err.value)
    assert "loss became" in str(err.value)
    saved = load_file(str(kept[-1] / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_qlora_training_on_a_4bit_base(tmp_path):
    from lorakit.quant import NF4Linear

    data = write_data(tmp_path)
    model, tokenizer = tiny_model_and_tokenizer()
    result = train(config(tmp_path, data, quantize="nf4", max_steps=12, dropout=0.0, learning_rate=3e-2),
                   model, tokenizer)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, NF4Linear)
    losses = [json.loads(line)["loss"] for line in result.metrics_path.read_text().splitlines()]
    assert losses[-1] < losses[0]
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any(key.endswith("q_proj.lora_A.weight") for key in saved)  # the same PEFT layout
