"""Training end to end on the real default model (slow): a few steps of the demo task."""

import json
from pathlib import Path

import pytest

from lorakit.train import TrainConfig, train

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "demo" / "data"


def test_a_few_steps_on_the_default_model_lower_the_loss(tmp_path):
    config = TrainConfig(data=str(DEMO / "train.jsonl"), val_data=str(DEMO / "test.jsonl"), model="default",
                         output_dir=str(tmp_path / "run"), r=8, alpha=16, dropout=0.0, learning_rate=2e-3,
                         max_steps=4, batch_size=8, max_length=96, save_every=2, eval_exact_match=4,
                         max_new_tokens=16, progress=False)
    result = train(config)
    losses = [e["loss"] for e in map(json.loads, result.metrics_path.read_text().splitlines())
              if e["kind"] == "train"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.val_loss is not None and result.exact_match is not None
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-4" / "state.json").is_file()
