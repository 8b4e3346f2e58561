"""The tiny Llama as a transformers folder and as GGUF files, shared by the GGUF tests."""

from pathlib import Path

import pytest

from lorakit.gguf.merge_gguf import merge_to_gguf
from tests.gguf.helpers import tiny_base
from tests.hf.conftest import write_gguf


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = tiny_base()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


@pytest.fixture(scope="session")
def llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama in F32, written as llama.cpp's converter lays it out (tests/hf's writer)."""
    model, tokenizer = tiny_base()
    return write_gguf(model, tokenizer, tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def llama_gguf_q8(llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with its matrices in Q8_0, as quantized models are shipped."""
    return merge_to_gguf(llama_gguf, None, tmp_path_factory.mktemp("tiny-gguf-q8") / "tiny-q8.gguf",
                         "q8_0").path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the llama.cpp tests out of `make test`: they run when `-m` names them (`make interop`)."""
    if "llamacpp" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="llama.cpp interop: run with `make interop` (pytest -m llamacpp)")
    for item in items:
        if item.get_closest_marker("llamacpp") is not None:
            item.add_marker(skip)
