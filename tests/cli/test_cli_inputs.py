"""The command line as a hostile user tries it: each bad input is one clear line, each odd one does
what it says."""

import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorakit.cli.main import main
from tests.train.helpers import write_data

ROOT = Path(__file__).resolve().parents[2]


def error_line(capsys) -> str:
    """The one error line (stderr may also hold transformers' loading bars)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("lorakit ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def train_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--max-steps", "2", "--r", "2", "--batch-size", "4", "--no-progress", *extra]


def test_one_target_name_works_as_a_one_item_list(model_dir, tmp_path):
    data = write_data(tmp_path)
    assert main(train_args(model_dir, data, tmp_path / "out", "--targets", "q_proj")) == 0
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"]


def test_one_target_name_in_yaml(model_dir, tmp_path):
    data = write_data(tmp_path)
    file = tmp_path / "run.yaml"
    file.write_text(f"data: {data}\nmodel: {model_dir}\noutput_dir: {tmp_path / 'out'}\ntargets: v_proj\n"
                    "max_steps: 1\nr: 2\nlearning_rate: 2e-4\nprogress: false\n")
    assert main(["train", "--config", str(file)]) == 0
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["v_proj"]


def test_a_target_name_that_matches_nothing_is_named_by_train_and_estimate(model_dir, tmp_path, capsys):
    data = write_data(tmp_path)
    assert main(train_args(model_dir, data, tmp_path / "out", "--targets", "q_proj,foo")) == 1
    err = error_line(capsys)
    assert "'foo' matched no module" in err and "q_proj" in err
    assert main(["estimate", "--model", "llama-3.1-8b", "--targets", "q_proj,foo"]) == 1
    assert "'foo' matched no module" in error_line(capsys)
    assert main(["estimate", "--model", "llama-3.1-8b", "--r", "16", "--targets", "q_proj"]) == 0


def test_yaml_numbers_written_as_text(model_dir, tmp_path, capsys):
    data = write_data(tmp_path)
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({"data": str(data), "model": str(model_dir),
                                    "output_dir": str(tmp_path / "o"), "max_steps": 1, "r": 2,
                                    "progress": False}) + "learning_rate: 2e-4\n")
    assert yaml.safe_load(file.read_text())["learning_rate"] == "2e-4"  # what PyYAML does
    assert main(["train", "--config", str(file)]) == 0
    lr = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])["lr"]
    assert lr == pytest.approx(2e-4)
    file.write_text(f"data: {data}\nlearning_rate: fast\n")
    assert main(["train", "--config", str(file)]) == 1
    assert "learning_rate must be a number, got 'fast'" in error_line(capsys)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    file = tmp_path / "run.yaml"
    file.write_text("data: train.jsonl\nr: [16\n")
    assert main(["train", "--config", str(file)]) == 1
    err = error_line(capsys)
    assert f"{file} is not valid YAML at line" in err and "unicode string" not in err


@pytest.mark.parametrize("limit", ["0", "-3", "two"])
def test_eval_limit_must_be_a_positive_count(limit, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--data", str(write_data(tmp_path)), "--limit", limit])
    assert exit_info.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_generate_refuses_a_negative_temperature(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "hi", "--temperature", "-1"])
    assert "--temperature: must be >= 0, got -1" in capsys.readouterr().err


def test_the_same_adapter_twice_is_refused(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    assert main(["generate", "--prompt", "hi", "--adapter", str(tmp_path / "a"),
                 "--adapter", str(tmp_path / "a") + "/"]) == 1
    assert "is given twice" in error_line(capsys)


def test_exact_match_without_validation_data_is_an_error(tmp_path, capsys):
    assert main(["train", "--data", str(write_data(tmp_path)), "--eval-exact-match", "5"]) == 1
    assert "eval_exact_match=5 needs validation records" in error_line(capsys)


@pytest.mark.parametrize("flag,value,expected", [
    ("--alpha", "-1", "alpha must be"), ("--dropout", "1.5", "dropout"),
    ("--weight-decay", "-0.1", "weight_decay must be a finite number >= 0, got -0.1"),
    # An infinite step or decay trained to NaN weights and saved them as the adapter.
    ("--lr", "inf", "learning_rate must be a finite number > 0, got inf"),
    ("--weight-decay", "inf", "weight_decay must be a finite number >= 0, got inf"),
    ("--device", "cuda:x", "unknown device 'cuda:x'; accepted: \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")])
def test_settings_are_checked_before_any_slow_work(flag, value, expected, tmp_path, capsys):
    # No model by that name exists: the setting must be refused before the model is looked for.
    assert main(["train", "--data", str(write_data(tmp_path)), "--model", str(tmp_path / "no-model"),
                 "--output-dir", str(tmp_path / "out"), flag, value]) == 1
    assert expected in error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line,expected", [
    ("resume: 'no'", "resume must be true or false, got 'no'"),  # a quoted 'no' counted as on, and resumed
    ("targets: 5", "targets must be all-linear, a regular expression or a list of module names, got 5"),
    ("learning_rate: [0.1]", "learning_rate must be a finite number > 0, got [0.1]"),
    ("val_data: 3", "val_data must be text (a JSONL file's path or null), got 3"),
    ("max_steps: true", "max_steps must be an integer >= 1 or None, got True")])
def test_yaml_values_of_the_wrong_kind_are_named(line, expected, tmp_path, capsys):
    file = tmp_path / "run.yaml"
    file.write_text(f"data: {write_data(tmp_path)}\nmodel: {tmp_path / 'no-model'}\n"
                    f"output_dir: {tmp_path / 'out'}\n{line}\n")
    assert main(["train", "--config", str(file)]) == 1
    assert f"invalid training setting: {expected}" in error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["folder", "device"])
def test_data_that_is_not_a_file_says_what_it_is(kind, tmp_path, capsys):
    path = str(tmp_path) if kind == "folder" else "/dev/null"
    assert main(["train", "--data", path]) == 1
    err = error_line(capsys)
    assert "no such file" not in err
    assert ("is a folder" if kind == "folder" else "is not a regular file") in err


def test_unknown_chat_roles_are_refused(tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "usr", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    assert main(["train", "--data", str(data)]) == 1
    assert "messages[0] has role 'usr'; known roles: system, user, assistant, tool" in error_line(capsys)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "LoRA rank (default: 16)" in out and "(default: 0.0002)" in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 64)" in " ".join(capsys.readouterr().out.split())


def test_load_model_is_exported_lazily():
    code = ("import sys, lorakit; assert 'transformers' not in sys.modules; "
            "from lorakit import load_model; from lorakit.hf import load_model as hf_load; "
            "assert load_model is hf_load")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_qlora_adapter_runs_on_its_4bit_base(model_dir, tmp_path, capsys):
    data = write_data(tmp_path)
    assert main(train_args(model_dir, data, tmp_path / "q", "--quantize", "nf4")) == 0
    adapter = str(tmp_path / "q" / "adapter")
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--adapter", adapter, "--quantize", "nf4",
                 "--data", str(data), "--limit", "2", "--no-exact-match"]) == 0
    assert "loss:" in capsys.readouterr().out
    # On the full-precision base: one warning line, naming the base it was trained on.
    done = subprocess.run([sys.executable, "-m", "lorakit.cli.main", "eval", "--model", str(model_dir),
                           "--adapter", adapter, "--data", str(data), "--limit", "2", "--no-exact-match"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("lorakit: warning: ") and "nf4" in warning[0]
    assert "warnings.warn(" not in done.stderr and "UserWarning" not in done.stderr  # no source line under it
    assert main(["eval", "--model", str(model_dir), "--adapter", adapter, "--adapter", str(tmp_path / "q"),
                 "--data", str(data)]) == 1
    assert "is given twice" in error_line(capsys)
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", adapter, "--quantize", "nf4",
                 "--output", str(merged)]) == 0
    difference = float(capsys.readouterr().out.split("merged vs unmerged: ")[1].split()[0])
    assert difference < 1e-3
    assert (merged / "config.json").is_file()


def test_sigterm_ends_a_run_like_ctrl_c(model_dir, tmp_path):
    data, out = write_data(tmp_path), tmp_path / "out"
    args = train_args(model_dir, data, out, "--save-every", "1")
    args[args.index("--max-steps") + 1] = "100000"
    process = subprocess.Popen([sys.executable, "-m", "lorakit.cli.main", *args], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-2").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "run the same command with --resume" in output
    assert not (out / ".lock").exists()


def test_separate_dropout_masks_flag(model_dir, tmp_path):
    data = write_data(tmp_path)
    assert main(train_args(model_dir, data, tmp_path / "out", "--separate-dropout-masks")) == 0
    settings = json.loads((tmp_path / "out" / "run.json").read_text())["settings"]
    assert settings["share_dropout_mask"] is False


def test_serve_refuses_a_busy_port_and_a_missing_adapter_dir_before_the_model_loads(tmp_path, capsys):
    # The model does not exist: each problem must be found first (they surfaced only after loading it).
    model = str(tmp_path / "no-model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", model, "--port", port]) == 1
    assert f"cannot listen on --host 127.0.0.1 --port {port}: Address already in use" in error_line(capsys)
    assert main(["serve", "--model", model, "--port", "0", "--adapter-dir", str(tmp_path / "none")]) == 1
    assert f"--adapter-dir {tmp_path / 'none'} does not exist" in error_line(capsys)


def test_a_model_folder_without_a_tokenizer_says_so_in_one_line(model_dir, tmp_path, capsys):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    assert main(["generate", "--model", str(folder),
                 "--prompt", "hi"]) == 1  # was transformers' 5-line message
    assert (f"could not load a tokenizer from {folder}: it holds none of tokenizer.json, "
            in error_line(capsys))


def test_chat_input_that_is_not_utf8_is_one_line(model_dir, monkeypatch, capsys):
    # A C locale hands the bytes b"\xff\xfe" over as lone surrogates: the tokenizer's TypeError named neither.
    monkeypatch.setattr(sys, "stdin", io.StringIO("\udcff\udcfe\n"))
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "2"]) == 1
    assert "standard input is not valid UTF-8 text" in error_line(capsys)


def test_a_config_that_is_a_folder_or_not_text_says_so(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 1
    assert f"--config {tmp_path}: is a folder" in error_line(capsys)  # was "no such file"
    file = tmp_path / "run.yaml"
    file.write_bytes(b"\xff\xfe")
    assert main(["train", "--config", str(file)]) == 1
    assert f"--config {file} is not UTF-8 text" in error_line(capsys)  # was a bare codec message


def test_a_run_folder_with_only_checkpoints_points_at_their_adapters(tmp_path, capsys):
    for step in (2, 10):  # a run stopped before its final adapter/
        (tmp_path / f"checkpoint-{step}" / "adapter").mkdir(parents=True)
        (tmp_path / f"checkpoint-{step}" / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["inspect", str(tmp_path)]) == 1
    assert f"give a checkpoint's, such as {tmp_path / 'checkpoint-10' / 'adapter'}" in error_line(capsys)


def test_generate_refuses_more_new_tokens_than_the_context_holds_as_serve_does(model_dir, capsys):
    # The tiny model has 128 positions; a rotary model decoded on past them until killed.
    assert main(["generate", "--model", str(model_dir), "--raw", "--prompt", "one two",
                 "--max-new-tokens", "200"]) == 1
    line = error_line(capsys)
    match = re.search(r"max_new_tokens=200 does not fit: the prompt is (\d+) tokens and the model's "
                      r"context is 128 tokens, so at most (\d+) can be generated", line)
    assert match, line
    prompt, room = int(match[1]), int(match[2])
    assert prompt + room == 128
    # The limit itself is accepted (and the tiny model greedily decodes that far without stopping).
    assert main(["generate", "--model", str(model_dir), "--raw", "--prompt", "one two",
                 "--max-new-tokens", str(room)]) == 0
