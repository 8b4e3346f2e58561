"""enable_checkpointing: transformers' new name where it exists, the old one otherwise, no warning."""

import warnings

from torch import nn

from lorakit.hf.checkpointing import enable_checkpointing
from tests.models import tiny_llama


def test_a_current_transformers_model_is_checkpointed_without_a_deprecation_warning():
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_checkpointing(model, use_reentrant=False)
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def test_an_older_model_gets_the_old_call_with_the_same_arguments():
    calls = []

    class Older(nn.Module):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)

    enable_checkpointing(Older())
    enable_checkpointing(Older(), use_reentrant=True)
    assert calls == [None, {"use_reentrant": True}]
