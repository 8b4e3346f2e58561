"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest
from torch import nn

from tests.models import MODEL_BUILDERS


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def hf_model(request: pytest.FixtureRequest) -> nn.Module:
    """Each tiny transformers model in turn: BERT, GPT-2 (Conv1D), Llama."""
    return MODEL_BUILDERS[request.param]()
