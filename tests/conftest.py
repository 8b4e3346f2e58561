"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tests.models import MODEL_BUILDERS


@pytest.fixture(autouse=True)
def torch_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """One thread for tiny models (thread hand-offs cost more than their matmuls), all for slow ones."""
    before = torch.get_num_threads()
    slow = request.node.get_closest_marker("slow") is not None
    torch.set_num_threads((os.cpu_count() or 1) if slow else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def hf_model(request: pytest.FixtureRequest) -> nn.Module:
    """Each tiny transformers model in turn: BERT, GPT-2 (Conv1D), Llama."""
    return MODEL_BUILDERS[request.param]()
