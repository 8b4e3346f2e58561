"""Evaluation runs in eval mode and gives the model back the mode it had, even when it fails."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.inject import add_adapter
from lorakit.core.walk import lora_layers
from lorakit.data import build_dataset, eval_pairs, load_records
from lorakit.train.evaluate import evaluation_loss, exact_match_score
from tests.train.helpers import tiny_model_and_tokenizer, write_data


class EvaluationFailed(RuntimeError):
    pass


def fail_in_eval_mode(module: nn.Module, args: Any, output: Any) -> None:
    """A forward hook: the evaluation did switch the layer to eval mode, then its forward fails."""
    assert not module.training
    raise EvaluationFailed("the forward failed in the middle of the evaluation")


def loss(model: nn.Module, tokenizer: Any, records: list) -> None:
    dataset, _ = build_dataset(records, tokenizer, max_length=64)
    evaluation_loss(model, dataset, batch_size=2, device=torch.device("cpu"))


def exact_match(model: nn.Module, tokenizer: Any, records: list) -> None:
    exact_match_score(model, tokenizer, eval_pairs(records, tokenizer), max_new_tokens=2)


def adapted_model(tmp_path: Path) -> tuple[nn.Module, Any, list]:
    model, tokenizer = tiny_model_and_tokenizer()
    add_adapter(model, LoraConfig(r=2, dropout=0.1))
    records, _ = load_records(write_data(tmp_path, count=4))
    return model, tokenizer, records


@pytest.mark.parametrize("evaluate", [loss, exact_match])
def test_an_evaluation_that_fails_leaves_the_model_and_its_lora_layers_training(
        evaluate: Callable[[nn.Module, Any, list], None], tmp_path: Path):
    model, tokenizer, records = adapted_model(tmp_path)
    model.train()
    layers = lora_layers(model)
    assert layers
    layers[-1].register_forward_hook(fail_in_eval_mode)
    with pytest.raises(EvaluationFailed):
        evaluate(model, tokenizer, records)
    assert all(layer.training for layer in layers)
    assert all(module.training for module in model.modules())


@pytest.mark.parametrize("evaluate", [loss, exact_match])
@pytest.mark.parametrize("training", [True, False])
def test_an_evaluation_gives_back_the_mode_the_model_had(evaluate: Callable[[nn.Module, Any, list], None],
                                                          training: bool, tmp_path: Path):
    model, tokenizer, records = adapted_model(tmp_path)
    model.train(training)
    evaluate(model, tokenizer, records)
    assert all(module.training is training for module in model.modules())
