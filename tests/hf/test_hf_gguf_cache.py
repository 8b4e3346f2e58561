"""GGUF loading through the safetensors cache, with a tiny GGUF written in the test."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from lorakit.formats.atomic import current_umask
from lorakit.hf import gguf_cache, load_model
from lorakit.hf.gguf_cache import cache_entry, cache_root, ensure_cached, is_complete

IDS = torch.tensor([[5, 17, 42, 99, 3, 250]])


def _entries(cache_dir: Path) -> list[str]:
    models = cache_dir / "models"
    return sorted(path.name for path in models.iterdir()) if models.exists() else []


def _forbid_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(gguf_cache, "_convert", fail)


def test_first_load_converts_and_matches_the_original(tiny, tiny_gguf: Path, cache_dir: Path):
    model, tokenizer = load_model(str(tiny_gguf))
    # The GGUF stores q/k permuted for llama.cpp; equal logits prove transformers undid it and
    # that the cache kept every weight.
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, tiny.model(IDS).logits)
    assert model.config.tie_word_embeddings
    assert getattr(model.config, "quantization_config", None) is None
    text = "what is the capital of france?"
    assert tokenizer.encode(text) == tiny.tokenizer.encode(text)
    assert tokenizer.chat_template == tiny.tokenizer.chat_template
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"

    entry = cache_entry(tiny_gguf)
    assert entry.parent == cache_dir / "models"
    assert entry.name.startswith("tiny-llama.F32-")
    assert is_complete(entry)
    assert _entries(cache_dir) == [entry.name]  # no temporary folder left behind
    # Not tempfile.mkdtemp's 0700 (and safetensors' 0600): readable as the umask says.
    mask = current_umask()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((entry / "model.safetensors").stat().st_mode) == 0o666 & ~mask


def test_second_load_reads_the_cache(tiny, tiny_gguf: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch):
    first, _ = load_model(str(tiny_gguf))
    _forbid_conversion(monkeypatch)
    second, tokenizer = load_model(str(tiny_gguf), dtype="bf16")
    assert second.dtype == torch.bfloat16
    torch.testing.assert_close(
        second.model.embed_tokens.weight.float(), first.model.embed_tokens.weight, atol=1e-2, rtol=1e-2
    )
    assert tokenizer.chat_template


def test_changed_file_gets_a_new_entry(tiny_gguf: Path, cache_dir: Path):
    before = cache_entry(tiny_gguf)
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache_entry(tiny_gguf) != before


def test_interrupted_conversion_leaves_no_cache(
    tiny_gguf: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    real_convert = gguf_cache._convert

    def interrupted(gguf_path: Path, target: Path) -> None:
        real_convert(gguf_path, target)  # the folder is fully written...
        raise KeyboardInterrupt  # ...but the process dies before the rename

    monkeypatch.setattr(gguf_cache, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(tiny_gguf))
    assert _entries(cache_dir) == []

    monkeypatch.setattr(gguf_cache, "_convert", real_convert)
    load_model(str(tiny_gguf))
    assert is_complete(cache_entry(tiny_gguf))


def test_losing_a_race_to_another_process_is_fine(
    tiny_gguf: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    real_convert = gguf_cache._convert

    def other_process_finishes_first(gguf_path: Path, target: Path) -> None:
        real_convert(gguf_path, cache_entry(gguf_path))  # the winner's complete entry
        real_convert(gguf_path, target)  # ours, which can no longer be renamed into place

    monkeypatch.setattr(gguf_cache, "_convert", other_process_finishes_first)
    entry = ensure_cached(tiny_gguf)
    assert is_complete(entry)
    assert _entries(cache_dir) == [entry.name]


def test_incomplete_entry_is_rebuilt(tiny_gguf: Path, cache_dir: Path):
    entry = ensure_cached(tiny_gguf)
    (entry / "model.safetensors").unlink()
    assert ensure_cached(tiny_gguf) == entry
    assert is_complete(entry)


def test_stale_partial_folders_are_removed(tiny_gguf: Path, cache_dir: Path):
    entry = cache_entry(tiny_gguf)
    # write_folder_atomically's temporary folders, and those of lorakit versions that used mkdtemp
    stale = [entry.parent / f".{entry.name}.tmp-1-0a1b2c3d", entry.parent / f".partial-{entry.name}-dead"]
    fresh = [entry.parent / f".{entry.name}.tmp-1-9f8e7d6c", entry.parent / f".partial-{entry.name}-running"]
    for folder in stale + fresh:
        folder.mkdir(parents=True)
    for folder in stale:
        old = folder.stat().st_mtime - 2 * gguf_cache.STALE_PARTIAL_SECONDS
        os.utime(folder, (old, old))
    ensure_cached(tiny_gguf)
    assert not any(folder.exists() for folder in stale)
    assert all(folder.exists() for folder in fresh)  # may belong to a conversion still running elsewhere


def test_not_a_gguf(tmp_path: Path, cache_dir: Path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(ValueError, match=r"is not a GGUF file: it starts with b'PK\\x03\\x04'") as error:
        load_model(str(path))
    assert str(path) in str(error.value)
    assert _entries(cache_dir) == []


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_gguf(tiny_gguf_source: Path, tmp_path: Path, cache_dir: Path, keep: float):
    data = tiny_gguf_source.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(ValueError, match="could not read GGUF file") as error:
        load_model(str(path))
    assert str(path) in str(error.value)
    assert _entries(cache_dir) == []  # neither an entry nor a .partial-* folder


def test_cache_root_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LORAKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lorakit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "lorakit"
