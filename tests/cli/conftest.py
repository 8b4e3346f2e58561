"""A tiny model saved as a local transformers folder, shared by the command-line tests."""

from pathlib import Path

import pytest

from tests.train.helpers import tiny_model_and_tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
