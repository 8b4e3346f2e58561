"""`lorakit inspect` runs the loader's checks: what load_adapter refuses, inspect shows as a problem."""

import re

import pytest

from lorakit import LoraConfig, add_adapter
from lorakit.cli.main import main
from lorakit.formats.inspect_adapter import describe_adapter, inspect_adapter
from lorakit.formats.io import load_adapter, save_adapter
from tests.formats.test_io import edit_config, edit_tensors
from tests.models import tiny_llama

Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def adapter(tmp_path):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]))
    return save_adapter(model, tmp_path / "adapter")


def test_a_sound_adapter_has_no_problems(adapter, capsys):
    report = inspect_adapter(adapter)
    assert report.problems == [] and "problems" not in report.text
    assert "LORA, r=2, alpha=4 (scale 2), dropout 0.0, bias none" in report.text
    assert "trained on   an unquantized base\n" in report.text
    assert main(["inspect", str(adapter)]) == 0
    assert capsys.readouterr().out.strip() == report.text


SPOILED = {
    "r=0": (lambda f: edit_config(f, r=0), "r must be an integer >= 1, got 0"),
    "alpha not a number": (lambda f: edit_config(f, lora_alpha="abc"),
                           "lora_alpha must be a number > 0, got 'abc'"),
    "IA3": (lambda f: edit_config(f, peft_type="IA3"),
            "has peft_type 'IA3'; lorakit loads LoRA adapters only"),
    "LoRA bias": (lambda f: edit_config(f, lora_bias=True),
                  r"uses a LoRA bias on B \(lora_bias\), which lorakit does not implement"),
    "config r differs from tensors": (lambda f: edit_config(f, r=8),
                                      "4 module.s. hold rank-2 tensors where the config gives r=8: "
                                      "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj, "
                                      "model.layers.1.self_attn.q_proj, model.layers.1.self_attn.v_proj$"),
    "rank_pattern differs": (lambda f: edit_config(f, rank_pattern={"v_proj": 4}),
                             "2 module.s. hold rank-2 tensors "
                             "where the config gives r=4: model.layers.0.self_attn.v_proj, model.layers.1"),
    "integer tensor": (lambda f: edit_tensors(f, lambda t: t.update({f"{Q}.lora_A.weight":
                                                                     t[f"{Q}.lora_A.weight"].long()})),
                       f"tensor '{Q}.lora_A.weight' in .* has dtype int64; adapter tensors must be "
                       "floating point"),
}


@pytest.mark.parametrize("problem", sorted(SPOILED))
def test_inspect_lists_what_the_loader_refuses(problem, adapter, capsys):
    spoil, message = SPOILED[problem]
    spoil(adapter)
    with pytest.raises(ValueError, match=message) as refused:
        load_adapter(tiny_llama(), adapter)
    report = inspect_adapter(adapter)
    assert len(report.problems) == 1 and re.search(message, report.problems[0])
    assert report.problems[0] in str(refused.value)  # the same check and words as the loader's
    text = report.text
    assert text.splitlines()[0] == f"{'adapter':<12} {adapter}"
    assert "  q_proj" in text and "parameters" in text  # what could be read is still shown
    assert text.split("\nproblems:\n")[1].lstrip().startswith(report.problems[0].splitlines()[0])
    assert main(["inspect", str(adapter)]) == 1
    assert capsys.readouterr().out.strip() == text


def test_invalid_config_values_show_as_written(adapter):
    edit_config(adapter, r=0, lora_alpha="abc", target_modules=7)
    text = describe_adapter(adapter)
    assert "method       peft_type='LORA', r=0, lora_alpha='abc'" in text
    assert "targets      7" in text
    assert "r must be an integer >= 1, got 0" in text and "lora_alpha must be a number > 0, got 'abc'" in text


def test_a_lora_a_without_its_b_is_a_problem(adapter):
    edit_tensors(adapter, lambda t: t.pop(f"{Q}.lora_B.weight"))
    report = inspect_adapter(adapter)
    assert report.problems == ["module 'model.layers.0.self_attn.q_proj' has lora_A.weight "
                               "but no lora_B.weight"]
    assert "3 modules" in report.text


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "adapter_config.json must hold a JSON object, got list"),
    ("{oops", "adapter_config.json is not valid JSON"),
])
def test_a_config_that_cannot_be_read_is_one_error_line(content, message, adapter, capsys):
    (adapter / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        describe_adapter(adapter)
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_llama(), adapter)
    assert main(["inspect", str(adapter)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorakit inspect: error: ") and message in err

