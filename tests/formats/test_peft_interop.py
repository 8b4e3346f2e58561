"""PEFT reads the adapters lorakit writes, and lorakit reads the adapters PEFT writes, same logits
(DoRA too)."""

import warnings

import pytest
import torch

from lorakit import LoraConfig, add_adapter
from lorakit.formats.io import load_adapter, save_adapter
from tests.models import logits, tiny_bert, tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")


def randomize(model, seed=0):
    """Random values for everything that trains (LoRA A/B, modules_to_save copies, trained biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


OURS = {
    "llama all-linear": (tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.05)),
    "llama patterns rslora embedding": (tiny_llama, LoraConfig(
        r=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
        alpha_pattern={"model.layers.1.self_attn.q_proj": 3}, use_rslora=True)),
    "llama regex layers exclude": (tiny_llama, LoraConfig(r=2, targets=r".*\.(q_proj|k_proj|up_proj)",
                                                          exclude=["k_proj"], layers=[1])),
    "gpt2 conv1d": (tiny_gpt2, LoraConfig(r=4, targets=["c_attn", "c_proj", "c_fc"])),
    "bert modules_to_save bias all": (tiny_bert, LoraConfig(r=4, targets=["query", "value"],
                                                            modules_to_save=["classifier"], bias="all")),
    "bert bias lora_only": (tiny_bert, LoraConfig(r=2, targets=["query", "key"], bias="lora_only")),
    "llama dora dropout": (tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.05, use_dora=True)),
    "llama dora rslora patterns": (tiny_llama, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"],
                                                          use_rslora=True, rank_pattern={"v_proj": 2},
                                                          use_dora=True)),
    "gpt2 conv1d dora": (tiny_gpt2, LoraConfig(r=4, targets=["c_attn", "c_proj"], use_dora=True)),
}


@pytest.mark.parametrize("case", sorted(OURS))
def test_peft_loads_lorakit_adapter(case, tmp_path):
    builder, config = OURS[case]
    model = builder()
    add_adapter(model, config)
    model.eval()  # add_adapter's new dropout modules start in training mode
    randomize(model)
    ids = tokens()
    expected = logits(model, ids)
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(builder(), tmp_path).eval()
    assert_same(logits(peft_model, ids), expected)


THEIRS = {
    "llama patterns": (tiny_llama, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                         rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 4},
                                         alpha_pattern={"down_proj": 5}, task_type="CAUSAL_LM")),
    "llama rslora all-linear": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear",
                                                 use_rslora=True)),
    "llama embedding": (tiny_llama, dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"])),
    "gpt2 conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                    fan_in_fan_out=True)),
    "bert seq-cls lora_only": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                               task_type="SEQ_CLS", bias="lora_only")),
    "bert bias all": (tiny_bert, dict(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                      bias="all")),
    "llama dora all-linear": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear",
                                               use_dora=True)),
    "llama dora rslora patterns": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    use_rslora=True, rank_pattern={"v_proj": 2},
                                                    use_dora=True)),
    "gpt2 conv1d dora": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                         fan_in_fan_out=True, use_dora=True)),
}


@pytest.mark.parametrize("case", sorted(THEIRS))
def test_lorakit_loads_peft_adapter(case, tmp_path):
    builder, kwargs = THEIRS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(builder(), peft.LoraConfig(**kwargs))
        randomize(peft_model)
        peft_model.save_pretrained(tmp_path)
    ids = tokens()
    expected = logits(peft_model.eval(), ids)
    model = builder()
    load_adapter(model, tmp_path)
    assert_same(logits(model, ids), expected)


def test_peft_loads_a_combined_adapter(tmp_path):
    from lorakit import combine_adapters

    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]), name="a")
    add_adapter(model, LoraConfig(r=4, targets=["q_proj", "o_proj"], use_rslora=True), name="b")
    model.eval()
    randomize(model)
    combine_adapters(model, {"a": 0.6, "b": 0.4}, name="ab")  # per-module ranks 6, 2 and 4
    ids = tokens()
    save_adapter(model, tmp_path, name="ab")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_same(logits(peft_model, ids), logits(model, ids))


def test_peft_loads_an_adapter_recording_its_nf4_base_without_complaint(tmp_path):
    from safetensors import safe_open

    from lorakit.quant import quantize_model

    model = quantize_model(tiny_llama(), "nf4")
    add_adapter(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize(model)
    save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        assert handle.metadata()["lorakit.base_quantization"] == "nf4"  # the record PEFT must tolerate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert not [w for w in caught if "nexpected" in str(w.message)]  # PEFT's warning for unknown config keys
    ours = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ours warns: trained on NF4, loaded unquantized
        load_adapter(ours, tmp_path)
    ids = tokens()
    assert_same(logits(peft_model, ids), logits(ours, ids))
