"""A run's output folder: one run at a time, never mixed with another run's work, nothing left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.train import TrainConfig, train
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.run_lock import RunFolderBusy, RunLock
from tests.train.helpers import tiny_model_and_tokenizer, write_data
from tests.train.test_train_loop import config, final_adapter

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, **overrides):
    data = write_data(tmp_path)
    values = dict(max_steps=4, save_every=2, dropout=0.0)
    values.update(overrides)
    return train(config(tmp_path, data, **values), *tiny_model_and_tokenizer())


def test_a_new_run_in_a_used_folder_is_refused_and_the_old_run_kept(tmp_path):
    run(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    adapter = final_adapter(tmp_path / "run")
    with pytest.raises(ValueError, match="holds another run .*--resume.*--overwrite"):
        run(tmp_path, r=2)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before
    assert final_adapter(tmp_path / "run").keys() == adapter.keys()


def test_overwrite_deletes_the_previous_run_only(tmp_path, capsys):
    run(tmp_path, max_steps=6)  # checkpoints 4 and 6
    (tmp_path / "run" / "notes.txt").write_text("mine")
    run(tmp_path, max_steps=2, overwrite=True)
    assert "--overwrite: deleted the previous run" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_resume_with_other_settings_names_each_difference(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError) as err:
        run(tmp_path, r=8, alpha=16, resume=True)
    message = str(err.value)
    assert "checkpoint-4 has r=4, this run asks r=8" in message
    assert "checkpoint-4 has alpha=8, this run asks alpha=16" in message
    assert "\n" not in message


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    result = run(tmp_path, save_every=0, resume=True)
    assert "--resume: no checkpoint in" in capsys.readouterr().out
    assert result.steps == 4


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from lorakit.train.run_lock import RunLock;"
         f"lock = RunLock(Path({str(folder)!r})); lock.acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"in use by another lorakit run \\(PID {holder.pid} on "):
            run(tmp_path)
        assert not (folder / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    run(tmp_path)  # the holder died: its lock went with it
    assert (folder / "adapter").is_dir() and not (folder / ".lock").exists()


def test_a_lock_in_the_same_process_conflicts_too(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with RunLock(folder):
        with pytest.raises(RunFolderBusy, match=f"PID {os.getpid()}"):
            run(tmp_path)


def test_a_stale_lock_from_a_killed_run_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": "elsewhere"}))
    run(tmp_path)
    assert f"took over the lock of an earlier run (PID {2 ** 22 + 7} on elsewhere)" in capsys.readouterr().out


def test_temporary_folders_of_dead_writers_are_removed_at_the_start(tmp_path):
    folder = tmp_path / "run"
    dead = 2 ** 22 + 11
    stale = [folder / f".tmp-checkpoint-3-{dead}", folder / f".adapter.tmp-{dead}-ab12cd34"]
    live = folder / f".tmp-checkpoint-5-{os.getpid()}"
    for path in [*stale, live]:
        path.mkdir(parents=True)
        (path / "trainable.safetensors").write_bytes(b"x" * 100)
    run(tmp_path)
    assert not any(p.exists() for p in stale)
    assert live.exists()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    run(tmp_path, max_steps=4)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"kind": "train", "step": 5, "lo')
    result = run(tmp_path, max_steps=6, resume=True)
    assert "dropped a torn last line" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in result.metrics_path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_damaged_metrics_line_in_the_middle_names_the_file_and_line(tmp_path):
    run(tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=f"{metrics}:2: not a JSON object"):
        run(tmp_path, resume=True, max_steps=6)


def test_a_failed_run_leaves_no_empty_folder(tmp_path):
    data = write_data(tmp_path)
    bad = TrainConfig(data=str(data), model=str(tmp_path / "no-such-model"), output_dir=str(tmp_path / "new"),
                      progress=False)
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises; the folder is the point
        train(bad)
    assert not (tmp_path / "new").exists()


def test_output_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(ValueError, match="output_dir .*run is a file; give a folder"):
        run(tmp_path)


def test_interrupt_says_how_to_continue(tmp_path, monkeypatch, capsys):
    import lorakit.train.loop as loop

    real_save = loop.save_checkpoint

    def interrupt_after_save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", interrupt_after_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    out = capsys.readouterr().out
    assert "checkpoint-2 is kept: run the same command with --resume" in out
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_released_lock_leaves_no_file_and_can_be_taken_again(tmp_path):
    for _ in range(3):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        assert not (tmp_path / ".lock").exists()


def test_run_files_get_the_umask_permissions_and_no_temporary_folder_stays(tmp_path):
    old = os.umask(0o022)
    try:
        run(tmp_path)
    finally:
        os.umask(old)
    folder = tmp_path / "run"
    checkpoint = list_checkpoints(folder)[-1]
    for path in [checkpoint / "trainable.safetensors", checkpoint / "optimizer.safetensors",
                 checkpoint / "adapter" / "adapter_model.safetensors",
                 folder / "adapter" / "adapter_model.safetensors",
                 folder / "run.json", folder / "metrics.jsonl"]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert checkpoint.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_resuming_a_finished_run_reports_its_last_loss(tmp_path):
    first = run(tmp_path, max_steps=4, save_every=4)
    again = run(tmp_path, max_steps=4, save_every=4, resume=True)
    assert again.steps == 4 and again.train_loss == pytest.approx(first.train_loss)


def test_an_empty_output_dir_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="output_dir must name a folder, got ''"):
        TrainConfig(data="x.jsonl", output_dir="")


def test_losing_the_race_for_a_new_folder_deletes_nothing_of_the_winner(tmp_path, monkeypatch):
    import lorakit.train.run_folder as run_folder

    def winner_got_there_first(self):
        (self.folder / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')  # the winner's work
        raise RunFolderBusy("in use")

    monkeypatch.setattr(run_folder.RunLock, "acquire", winner_got_there_first)
    with pytest.raises(RunFolderBusy):
        run(tmp_path)
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
