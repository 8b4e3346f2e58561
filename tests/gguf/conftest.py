"""The tiny Llama as a transformers folder and as GGUF files, shared by the GGUF tests."""

from pathlib import Path

import pytest

from tests.gguf.helpers import base_folder, write_llama_gguf
from tests.models import tiny_llama


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama in F32: its weights are exactly those of tiny_llama()."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    write_llama_gguf(tiny_llama(), path, "F32")
    return path


@pytest.fixture(scope="session")
def llama_gguf_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its matrices in Q8_0, as quantized models are shipped."""
    path = tmp_path_factory.mktemp("tiny-gguf-q8") / "tiny-q8.gguf"
    write_llama_gguf(tiny_llama(), path, "Q8_0")
    return path
