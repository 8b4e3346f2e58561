"""The `lorakit` command end to end on a tiny model saved as a local transformers folder."""

from pathlib import Path

import pytest
import torch
import yaml

from lorakit.cli.main import COMMANDS, main
from tests.train.helpers import write_data


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("run")
    data = write_data(work)
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(work / "out"),
                 "--max-steps", "4", "--r", "4", "--lr", "1e-2", "--batch-size", "4", "--no-progress"]) == 0
    return work


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_train_writes_adapter_metrics_and_plot(trained, capsys):
    out = trained / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()


def test_yaml_config_with_flag_override(model_dir, tmp_path):
    data = write_data(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(model_dir), "data": str(data),
                                      "output_dir": str(tmp_path / "o"),
                                      "max_steps": 50, "r": 2, "batch_size": 4, "progress": False}))
    assert main(["train", "--config", str(config), "--max-steps", "2"]) == 0
    steps = (tmp_path / "o" / "metrics.jsonl").read_text().count('"kind": "train"')
    assert steps == 2


def test_inspect_eval_generate_and_merge(trained, model_dir, tmp_path, capsys):
    adapter = str(trained / "out" / "adapter")
    assert main(["inspect", adapter]) == 0
    assert "q_proj" in capsys.readouterr().out

    data = str(trained / "train.jsonl")
    assert main(["eval", "--model", str(model_dir), "--adapter", adapter, "--data", data, "--limit", "4",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "loss:" in out and "exact match:" in out

    assert main(["generate", "--model", str(model_dir), "--adapter", adapter, "--raw", "--prompt",
                 "Question: one two? Answer:", "--max-new-tokens", "3"]) == 0

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", adapter, "--output", str(merged)]) == 0
    printed = capsys.readouterr().out
    difference = float(printed.split("merged vs unmerged: ")[1].split()[0])
    assert difference < 1e-4
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name in reloaded.state_dict())
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_estimate_reproduces_reference_counts(capsys):
    assert main(["estimate", "--model", "llama-3.1-8b", "--r", "16",
                 "--targets", "q_proj,k_proj,v_proj,o_proj"]) == 0
    assert "trainable params: 13,631,488" in capsys.readouterr().out
    assert main(["estimate", "--model", "gpt3-175b", "--r", "8", "--targets", "q_proj,v_proj"]) == 0
    assert "trainable params: 37,748,736" in capsys.readouterr().out


def test_errors_are_one_clear_line(capsys, tmp_path):
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit train: error:") and "\n" not in err and "Traceback" not in err
    assert main(["train", "--max-steps", "2"]) == 1
    assert "no training data" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        main(["--debug", "inspect", str(tmp_path / "nothing")])
