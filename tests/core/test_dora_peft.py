"""DoRA adapter files: PEFT loads ours and we load PEFT's (lora_magnitude_vector), same logits."""

import json
import warnings

import pytest

from lorakit import LoraConfig, add_adapter
from lorakit.core.io import load_adapter, save_adapter
from tests.core.test_peft_interop import assert_same, randomize
from tests.models import logits, tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")

CASES = {
    "llama all-linear": (tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.05, use_dora=True),
                         dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
    "llama rslora patterns": (tiny_llama, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], use_rslora=True,
                                                     rank_pattern={"v_proj": 2}, use_dora=True),
                              dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                   rank_pattern={"v_proj": 2}, use_dora=True)),
    "gpt2 conv1d": (tiny_gpt2, LoraConfig(r=4, targets=["c_attn", "c_proj"], use_dora=True),
                    dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loads_our_dora_adapter(case, tmp_path):
    builder, config, _ = CASES[case]
    model = add_adapter(builder(), config).eval()
    randomize(model)
    ids = tokens()
    expected = logits(model, ids)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(builder(), tmp_path).eval()
    assert peft_model.peft_config["default"].use_dora
    assert_same(logits(peft_model, ids), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_we_load_peft_dora_adapters(case, tmp_path):
    builder, _, kwargs = CASES[case]
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
