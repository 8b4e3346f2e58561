"""Where an adapter is found (a training run's folder stands for its adapter), and the record of
the base it was trained on (4-bit NF4 or not), with a warning when it is loaded onto the other kind."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, add_adapter
from lorakit.formats.inspect_adapter import describe_adapter
from lorakit.formats.io import load_adapter, save_adapter
from lorakit.quant import quantize_model
from tests.models import logits, randomize_adapters, tiny_llama, tokens

RECORD = "lorakit.base_quantization"


def saved(folder, quantized, seed=0):
    model = tiny_llama()
    if quantized:
        quantize_model(model, "nf4")
    add_adapter(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    model.eval()
    randomize_adapters(model, seed)
    save_adapter(model, folder)
    return model


def recorded(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        return handle.metadata().get(RECORD)


def base(quantized):
    model = tiny_llama()
    return quantize_model(model, "nf4") if quantized else model


def load_warnings(model, folder, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(model, folder, **kwargs)
    return [str(w.message) for w in caught if "trained on" in str(w.message)]


def test_the_base_kind_is_recorded_and_a_match_loads_silently(tmp_path):
    trained = saved(tmp_path / "q", quantized=True)
    saved(tmp_path / "f", quantized=False)
    assert recorded(tmp_path / "q") == "nf4" and recorded(tmp_path / "f") == "none"
    # the config is PEFT's, unchanged
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text()).keys() == \
        json.loads((tmp_path / "f" / "adapter_config.json").read_text()).keys()
    assert ("trained on   a 4-bit NF4 base (load the base with --quantize nf4)\n"
            in describe_adapter(tmp_path / "q"))
    model = base(quantized=True)
    assert load_warnings(model, tmp_path / "q") == []
    assert torch.equal(logits(model, tokens()), logits(trained, tokens()))
    assert load_warnings(base(quantized=False), tmp_path / "f") == []


def test_an_nf4_adapter_on_a_full_precision_base_warns_naming_both_and_the_remedy(tmp_path):
    saved(tmp_path / "q", quantized=True)
    model = base(quantized=False)
    [message] = load_warnings(model, tmp_path / "q")
    assert "\n" not in message
    assert f"adapter {tmp_path / 'q'} was trained on a 4-bit NF4 base" in message
    assert "this model's adapted layers are not quantized" in message and "--quantize nf4" in message
    hot = tmp_path / "q2"
    saved(hot, quantized=True, seed=1)
    assert len(load_warnings(model, hot, name="default", replace=True)) == 1  # a hot swap checks too


def test_a_full_precision_adapter_on_an_nf4_base_warns(tmp_path):
    saved(tmp_path / "f", quantized=False)
    [message] = load_warnings(base(quantized=True), tmp_path / "f")
    assert "was trained on an unquantized base, but this model's adapted layers are 4-bit NF4" in message
    assert "without --quantize nf4" in message


@pytest.mark.parametrize("quantized", [True, False])
def test_nothing_recorded_means_no_warning(quantized, tmp_path):
    saved(tmp_path / "a", quantized=not quantized)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as PEFT writes it
    assert load_warnings(base(quantized), tmp_path / "a") == []


def run_folder(tmp_path):
    """What `lorakit train --output-dir run` leaves: adapter/, checkpoints, metrics, a plot."""
    run = tmp_path / "run"
    model = saved(run / "adapter", quantized=False)
    save_adapter(model, run / "checkpoint-10" / "adapter")
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    (run / "loss.png").write_bytes(b"\x89PNG")
    return run, model


def test_a_training_runs_folder_stands_for_its_adapter(tmp_path):
    run, trained = run_folder(tmp_path)
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # accepted silently
        assert load_adapter(model, run) == "default"
    assert torch.equal(logits(model, tokens()), logits(trained, tokens()))
    text = describe_adapter(run)
    assert text.splitlines()[0] == f"{'adapter':<12} {run / 'adapter'}"
    assert load_adapter(model, run / "checkpoint-10") == "checkpoint-10"  # a checkpoint holds one adapter too


def test_a_folder_without_an_adapter_hints_at_the_runs_adapter(tmp_path):
    run, _ = run_folder(tmp_path)
    (run / "adapter" / "adapter_config.json").unlink()  # no longer a complete adapter: not taken
    for read in (lambda: load_adapter(tiny_llama(), run), lambda: describe_adapter(run)):
        with pytest.raises(FileNotFoundError) as err:
            read()
        assert str(err.value) == (f"{run} is not an adapter folder: adapter_config.json is missing (an "
                                  "adapter folder holds adapter_config.json and adapter_model.safetensors); "
                                  f"{run} looks like a training run's folder, whose adapter is "
                                  f"{run / 'adapter'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not an adapter folder: adapter_config.json is missing .*"
                                                "adapter_model.safetensors\\)$"):
        load_adapter(tiny_llama(), tmp_path / "empty")  # no hint where there is no adapter/
    with pytest.raises(FileNotFoundError, match="it is a file .give the adapter's folder"):
        load_adapter(tiny_llama(), run / "metrics.jsonl")
