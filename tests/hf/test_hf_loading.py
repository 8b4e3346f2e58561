"""load_model on transformers folders: round trip, dtypes, tokenizer setup and error messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lorakit.hf import load_model

IDS = torch.tensor([[5, 17, 42, 99, 3]])


def test_loads_a_folder_back(tiny):
    model, tokenizer = load_model(str(tiny.folder))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, tiny.model(IDS).logits)
    assert tokenizer.encode("the quick brown fox") == tiny.tokenizer.encode("the quick brown fox")
    assert tokenizer.chat_template == tiny.tokenizer.chat_template


def test_accepts_a_path_object(tiny):
    model, _ = load_model(tiny.folder, device="cpu")
    assert model.config.num_hidden_layers == tiny.model.config.num_hidden_layers


def test_tokenizer_pads_with_eos_on_the_right(tiny):
    assert tiny.tokenizer.pad_token is None  # the saved tokenizer has none
    model, tokenizer = load_model(str(tiny.folder))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id
    batch = tokenizer(["hello", "hello world, the quick brown fox"], padding=True)
    assert batch["attention_mask"][0][-1] == 0  # padding went to the right


def test_existing_pad_token_is_kept(tiny, tmp_path: Path):
    folder = tmp_path / "with-pad"
    shutil.copytree(tiny.folder, folder)
    tokenizer = tiny.tokenizer.__class__.from_pretrained(folder)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.save_pretrained(folder)
    _, loaded = load_model(str(folder))
    assert loaded.pad_token == "<|endoftext|>"


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bf16", torch.bfloat16), ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)],
)
def test_dtype(tiny, dtype, expected):
    model, _ = load_model(str(tiny.folder), dtype=dtype, device="cpu")
    assert {parameter.dtype for parameter in model.parameters()} == {expected}


def test_bad_dtype_fails_before_touching_the_spec():
    with pytest.raises(ValueError, match=r"unsupported dtype 'int4'.*\"bf16\""):
        load_model("/nonexistent/model", dtype="int4")


def test_bad_device():
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'; accepted: \"auto\", \"cpu\", \"cuda\""):
        load_model("/nonexistent/model", device="gpu0")


def test_bad_quantize_fails_before_touching_the_spec():
    with pytest.raises(ValueError, match=r"quantize must be None or one of 'nf4'; got 'int4'"):
        load_model("/nonexistent/model", quantize="int4")


def test_quantize_reads_the_folder_into_4bit(tiny):
    from lorakit.quant import NF4Linear

    model, tokenizer = load_model(tiny.folder, quantize="nf4")
    assert isinstance(model.model.layers[1].mlp.up_proj, NF4Linear) and not model.training
    assert tokenizer.padding_side == "right"  # the tokenizer is prepared as without quantize


def test_missing_path(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        load_model(str(missing))
    assert str(missing) in str(error.value)
    assert ".gguf" in str(error.value) and "'default'" in str(error.value)


def test_hub_id_is_refused_without_a_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("load_model tried to reach the Hub")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(FileNotFoundError) as error:
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(error.value)
    assert "lorakit loads only local folders, .gguf files or 'default'" in message
    assert "hf download HuggingFaceTB/SmolLM2-135M-Instruct" in message


def test_folder_without_config(tmp_path: Path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="has no config.json") as error:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(error.value)
    assert "weights.gguf" in str(error.value)  # points at the file the user probably meant


def test_adapter_folder_is_not_a_model(tmp_path: Path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="looks like a LoRA adapter folder"):
        load_model(str(tmp_path))


def test_spec_of_the_wrong_type():
    with pytest.raises(TypeError, match="model spec must be a string or path, got int 3"):
        load_model(3)  # type: ignore[arg-type]


def test_pickled_weights_are_refused(tiny, tmp_path: Path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny.folder / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"no \.safetensors weights \(found pytorch_model\.bin"):
        load_model(str(folder))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tiny, tmp_path: Path, damage: str):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny.folder, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"definitely not safetensors")
    with pytest.raises(ValueError, match="corrupt or truncated") as error:
        load_model(str(folder))
    assert str(weights) in str(error.value)


def test_file_that_is_not_gguf_or_folder(tmp_path: Path):
    path = tmp_path / "model.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"is a file but not a \.gguf file"):
        load_model(str(path))


def test_folder_without_tokenizer(tiny, tmp_path: Path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny.folder / name, folder)
    with pytest.raises(ValueError, match="could not load a tokenizer from"):
        load_model(str(folder))
