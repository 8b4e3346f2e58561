"""Adapter files: PEFT layout, exact round trips, validation before any change, hot swap, atomic saves."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import LoraConfig, add_adapter
from lorakit.formats import io
from lorakit.formats.inspect_adapter import describe_adapter
from lorakit.formats.io import load_adapter, save_adapter
from tests.models import MLP, logits, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tokens


def trained(builder, config, name="default", seed=0):
    model = builder()
    add_adapter(model, config, name)
    model.eval()  # add_adapter's new dropout modules start in training mode
    randomize_trainables(model, seed)
    return model


def randomize_trainables(model, seed=0):
    """Random LoRA weights, and random copies/biases where the config trains them."""
    randomize_adapters(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, lorakit.list_adapters(model)


def assert_unchanged(model, before):
    state, adapters = before
    assert lorakit.list_adapters(model) == adapters
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())


BERT_CONFIG = LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"], bias="all")
CASES = {
    "llama": (tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.1)),  # a loaded adapter follows eval()
    "gpt2": (tiny_gpt2, LoraConfig(r=4, targets=["c_attn", "c_proj"])),
    "bert": (tiny_bert, BERT_CONFIG),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_identical(case, tmp_path):
    builder, config = CASES[case]
    model = trained(builder, config)
    ids = tokens()
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    fresh = builder()
    assert load_adapter(fresh, tmp_path / "adapter") == "default"
    assert torch.equal(logits(fresh, ids), expected)


def test_file_layout_matches_peft(tmp_path):
    model = tiny_llama()
    model.config._name_or_path = "org/tiny-llama"
    add_adapter(model, LoraConfig(r=4, alpha=16, targets=["q_proj", "v_proj"], dropout=0.1), name="mine")
    save_adapter(model, tmp_path, name="mine")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        # "format" as PEFT writes it; the base's kind where every reader ignores it (see peft_format)
        assert handle.metadata() == {"format": "pt", "lorakit.base_quantization": "none"}
        keys = set(handle.keys())
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert f"{q}.lora_A.weight" in keys and f"{q}.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * 2  # q and v in 2 layers, A and B each: nothing of the base model
    assert not any("mine" in k for k in keys)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors[f"{q}.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["lora_dropout"] == 0.1
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "org/tiny-llama"
    for key in ("bias", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                "inference_mode"):
        assert key in config


def test_all_linear_is_written_as_names_and_gpt2_sets_fan_in_fan_out(tmp_path):
    save_adapter(trained(tiny_llama, LoraConfig(r=2, layers=[1])), tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                        "up_proj", "v_proj"]
    assert config["layers_to_transform"] == [1]
    save_adapter(trained(tiny_gpt2, LoraConfig(r=2, targets=["c_attn"])), tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"


def test_only_the_named_adapter_is_saved(tmp_path):
    model = trained(tiny_llama, LoraConfig(r=2, targets=["q_proj"]), name="a")
    add_adapter(model, LoraConfig(r=3, targets=["q_proj", "k_proj"]), name="b")
    save_adapter(model, tmp_path, name="a")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 4 and all(t.shape[0] == 2 or t.shape[1] == 2 for t in tensors.values())
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        save_adapter(model, tmp_path, name="zz")


def test_bias_lora_only_and_embedding_round_trip(tmp_path):
    config = LoraConfig(r=2, targets=["query", "word_embeddings"], bias="lora_only")
    model = trained(tiny_bert, config)
    save_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A" in keys
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))


def test_load_onto_a_model_with_adapters_picks_free_names(tmp_path):
    save_adapter(trained(tiny_llama, LoraConfig(r=2, targets=["q_proj"])), tmp_path / "french")
    model = tiny_llama()
    assert load_adapter(model, tmp_path / "french") == "default"
    assert load_adapter(model, tmp_path / "french") == "french"
    assert load_adapter(model, tmp_path / "french") == "french_2"
    assert load_adapter(model, tmp_path / "french", name="x") == "x"
    assert lorakit.list_adapters(model) == ["default", "french", "french_2", "x"]
    assert lorakit.active_adapters(model) == ["x"]


def good_adapter(tmp_path, builder=tiny_llama):
    save_adapter(trained(builder, LoraConfig(r=2, targets=["q_proj", "v_proj"])), tmp_path / "good")
    return tmp_path / "good"


def edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(folder, change):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD_FILES = {
    "missing key": (lambda f: edit_tensors(f, lambda t: t.pop(Q_A)), "missing from the file: model.layers.0"),
    "unexpected key": (lambda f: edit_tensors(f, lambda t: t.update({"base_model.model.x.lora_A.weight":
                                                                     t[Q_A].clone()})),
                       "fit no module of this model: x.lora_A.weight"),
    "non-finite": (lambda f: edit_tensors(f, lambda t: t[Q_A].fill_(float("nan"))), "inf or NaN"),
    "integer tensor": (lambda f: edit_tensors(f, lambda t: t.update({Q_A: t[Q_A].long()})), "floating point"),
    "peft type": (lambda f: edit_config(f, peft_type="IA3"),
                  "peft_type 'IA3'; lorakit loads LoRA adapters only"),
    "no peft type": (lambda f: edit_config(f, peft_type=None), "peft_type None"),
    "r out of range": (lambda f: edit_config(f, r=0), "r must be an integer >= 1, got 0"),
    "dropout": (lambda f: edit_config(f, lora_dropout=1.5), r"lora_dropout must be in \[0, 1\), got 1.5"),
    "bias": (lambda f: edit_config(f, bias="some"), "bias must be one of none, all, lora_only, got 'some'"),
    "dora without magnitudes": (lambda f: edit_config(f, use_dora=True),
                                "missing from the file: "
                                "model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
    "targets nothing": (lambda f: edit_config(f, target_modules=["qkv"]), "'qkv'.* matched no module"),
    "bad json": (lambda f: (f / "adapter_config.json").write_text("{oops"), "not valid JSON"),
    "not safetensors": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"12345678garbage"),
                        "not a readable safetensors file"),
    "pickle only": (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"),
                    r"(?s)only adapter_model.bin, a pickle.*weights_only=True"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
}


@pytest.mark.parametrize("problem", sorted(BAD_FILES))
@pytest.mark.parametrize("holding", ["plain", "with adapter"])
def test_bad_file_is_refused_and_model_untouched(problem, holding, tmp_path):
    spoil, message = BAD_FILES[problem]
    folder = good_adapter(tmp_path)
    spoil(folder)
    model = tiny_llama()
    if holding == "with adapter":
        add_adapter(model, LoraConfig(r=3, targets=["k_proj", "v_proj"]), name="other")
    before = snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_adapter(model, folder, name="new")
    assert_unchanged(model, before)


def test_adapter_of_another_base_is_refused_naming_module_and_shapes(tmp_path):
    folder = good_adapter(tmp_path)
    edit_config(folder, base_model_name_or_path="org/other-model")
    model = tiny_llama(hidden=48)
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        load_adapter(model, folder)
    text = str(err.value)
    assert "module 'model.layers.0.self_attn.q_proj', lora_A.weight: the file has shape (2, 32), " \
           "this model needs (2, 48)" in text
    assert "probably trained on another base model (its config names 'org/other-model')" in text
    assert_unchanged(model, before)


def test_name_taken_and_missing_folder(tmp_path):
    folder = good_adapter(tmp_path)
    model = tiny_llama()
    load_adapter(model, folder, name="a")
    before = snapshot(model)
    with pytest.raises(ValueError, match="'a' already exists.*replace=True"):
        load_adapter(model, folder, name="a")
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        load_adapter(model, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no adapter 'b'"):
        load_adapter(model, folder, name="b", replace=True)
    assert_unchanged(model, before)


def test_merged_model_refuses_a_new_adapter(tmp_path):
    folder = good_adapter(tmp_path)
    model = trained(tiny_llama, LoraConfig(r=2, targets=["k_proj"]), name="a")
    lorakit.merge(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        load_adapter(model, folder)
    assert_unchanged(model, before)


def test_hot_swap_copies_in_place(tmp_path):
    config = LoraConfig(r=2, targets=["q_proj", "v_proj"])
    save_adapter(trained(tiny_llama, config, seed=1), tmp_path / "one")
    save_adapter(trained(tiny_llama, config, seed=2), tmp_path / "two")
    model = tiny_llama()
    load_adapter(model, tmp_path / "one", name="a")
    params = {n: p for n, p in model.named_parameters()}
    modules = {n: m for n, m in model.named_modules()}
    ids = tokens()
    out_one = logits(model, ids)
    assert load_adapter(model, tmp_path / "two", name="a", replace=True) == "a"
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(m is modules[n] for n, m in model.named_modules())
    reference = tiny_llama()
    load_adapter(reference, tmp_path / "two")
    out_two = logits(model, ids)
    assert not torch.equal(out_two, out_one)
    assert torch.equal(out_two, logits(reference, ids))


def test_hot_swap_refuses_other_shapes(tmp_path):
    save_adapter(trained(tiny_llama, LoraConfig(r=2, targets=["q_proj"])), tmp_path / "r2")
    save_adapter(trained(tiny_llama, LoraConfig(r=4, targets=["q_proj"])), tmp_path / "r4")
    model = tiny_llama()
    load_adapter(model, tmp_path / "r2")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"shape \(4, 32\), this model needs \(2, 32\)"):
        load_adapter(model, tmp_path / "r4", replace=True)
    assert_unchanged(model, before)


def test_hot_swap_keeps_a_compiled_model_working(tmp_path):
    config = LoraConfig(r=2, targets=["up", "down"])
    for seed in (1, 2):
        model = MLP()
        add_adapter(model, config)
        randomize_adapters(model, seed)
        save_adapter(model, tmp_path / str(seed))
    model = MLP()
    load_adapter(model, tmp_path / "1")
    compiled = torch.compile(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = compiled(x)
        load_adapter(compiled, tmp_path / "2", replace=True)  # the wrapper is accepted too
        second = compiled(x)
        torch.testing.assert_close(second, model(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, second)


def test_save_replaces_atomically(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    save_adapter(trained(tiny_llama, LoraConfig(r=2, targets=["q_proj"])), target)
    old = (target / "adapter_model.safetensors").read_bytes()
    newer = trained(tiny_llama, LoraConfig(r=4, targets=["q_proj"]))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(newer, target)
    monkeypatch.undo()
    assert (target / "adapter_model.safetensors").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind
    save_adapter(newer, target)
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_into_a_folder_with_other_files_keeps_them(tmp_path):
    (tmp_path / "optimizer.safetensors").write_text("not ours")
    model = trained(tiny_llama, LoraConfig(r=2, targets=["q_proj"]))
    save_adapter(model, tmp_path)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "optimizer.safetensors"]
    with pytest.raises(ValueError, match="is a file"):
        save_adapter(model, tmp_path / "optimizer.safetensors")


def test_describe_adapter(tmp_path):
    model = tiny_bert()
    model.config._name_or_path = "org/bert-tiny"
    add_adapter(model, LoraConfig(r=4, alpha=8, targets=["query", "value"], rank_pattern={"value": 2},
                                  modules_to_save=["classifier"]))
    save_adapter(model, tmp_path)
    text = describe_adapter(tmp_path)
    assert "org/bert-tiny" in text and "query, value" in text
    assert "4 modules in 2 layers" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    assert rows["query"][1:] == ["2", "32", "->", "32", "4", "8", "2", "512"]
    assert rows["value"][1:] == ["2", "32", "->", "32", "2", "8", "4", "256"]
    assert "classifier (99 parameters)" in text
    assert "867 trainable" in text  # 512 + 256 + 99
    assert "dtype float32" in text and "KB" in text
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        describe_adapter(tmp_path / "nowhere")
