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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the llama.cpp tests out of `make test`: they run when `-m` names them (`make interop`)."""
    if "llamacpp" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="llama.cpp interop: run with `make interop` (pytest -m llamacpp)")
    for item in items:
        if item.get_closest_marker("llamacpp") is not None:
            item.add_marker(skip)
