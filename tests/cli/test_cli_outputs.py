"""What the command line writes: a careless command never replaces finished work, and a bad output
path is one line."""

import pytest

from lorakit.cli.main import main
from tests.cli.test_cli_inputs import error_line, train_args
from tests.train.helpers import write_data


def test_resume_of_a_finished_run_without_checkpoints_keeps_its_adapter(model_dir, tmp_path, capsys):
    data, out = write_data(tmp_path), tmp_path / "out"
    assert main(train_args(model_dir, data, out)) == 0  # no --save-every: no checkpoint, only adapter/
    weights = out / "adapter" / "adapter_model.safetensors"
    before = weights.read_bytes()
    capsys.readouterr()
    assert main(train_args(model_dir, data, out, "--resume")) == 1
    err = error_line(capsys)
    assert "has no checkpoint" in err and "--overwrite" in err
    assert weights.read_bytes() == before


@pytest.mark.parametrize("file", ["optimizer.safetensors", "state.json"])
def test_resume_from_a_damaged_checkpoint_names_it_and_the_one_before(file, model_dir, tmp_path, capsys):
    data, out = write_data(tmp_path), tmp_path / "out"
    assert main(train_args(model_dir, data, out, "--save-every", "1")) == 0  # checkpoint-1 and checkpoint-2
    damaged = out / "checkpoint-2" / file
    damaged.write_bytes(damaged.read_bytes()[:50])  # a torn copy, a full disk
    capsys.readouterr()
    assert main(train_args(model_dir, data, out, "--save-every", "1", "--resume")) == 1
    err = error_line(capsys)
    assert f"checkpoint {out / 'checkpoint-2'} is damaged ({file}: " in err
    assert "delete it to resume from checkpoint-1" in err


@pytest.mark.parametrize("command", ["merge", "merge-gguf", "export"])
def test_an_output_inside_a_file_is_refused_before_the_model_loads(command, tmp_path, capsys):
    # The model does not exist: the output path must be refused first (it was "[Errno 17] File exists",
    # after loading).
    file = write_data(tmp_path)
    output = file / ("out.gguf" if command != "merge" else "merged")
    args = {"merge": ["merge", "--model", str(tmp_path / "no-model"), "--adapter", str(tmp_path), "--output"],
            "merge-gguf": ["merge", "--adapter", str(tmp_path), "--output"],
            "export": ["export", str(tmp_path), "--base", str(tmp_path / "no-model"), "-o"]}[command]
    assert main([*args, str(output)]) == 1
    assert f"--output {output} cannot be created: {file} is a file, not a folder" in error_line(capsys)


def test_a_train_output_dir_inside_a_file_reads_as_merge_and_export_do(tmp_path, capsys):
    # The model does not exist: the folder is refused before it loads (it was mkdir's "Not a directory").
    data = write_data(tmp_path)
    output = data / "sub"
    assert main(train_args(tmp_path / "no-model", data, output)) == 1
    assert f"output_dir {output} cannot be created: {data} is a file, not a folder" in error_line(capsys)


def test_export_never_writes_over_a_file_that_is_not_a_gguf(model_dir, tmp_path, capsys):
    data, out = write_data(tmp_path), tmp_path / "out"
    assert main(train_args(model_dir, data, out)) == 0
    weights = out / "adapter" / "adapter_model.safetensors"
    kept = {weights: weights.read_bytes(), data: data.read_bytes()}
    for target in kept:  # both were replaced by the GGUF file, losing the adapter or the data
        capsys.readouterr()
        assert main(["export", str(out), "--base", str(model_dir), "-o", str(target)]) == 1
        assert f"output {target} exists and is not a GGUF file" in error_line(capsys)
    assert all(file.read_bytes() == before for file, before in kept.items())
    assert main(["export", str(out), "--base", str(model_dir), "-o", str(tmp_path / "a.gguf")]) == 0
    assert main(["export", str(out), "--base", str(model_dir),
                 "-o", str(tmp_path / "a.gguf")]) == 0  # its own file
