"""Atomic writes of files and folders: temporaries named by PID, removed on failure, stale ones
removed later, umask permissions; the writers that go through them."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from lorakit import LoraConfig, add_adapter
from lorakit.formats import atomic as files
from lorakit.formats.atomic import (
    fresh_temp_folder,
    remove_stale_temps,
    write_file_atomically,
    write_folder_atomically,
)
from lorakit.formats.io import save_adapter
from lorakit.hf.saving import save_merged
from lorakit.train import TrainConfig
from lorakit.train.metrics import MetricsLog, plot_losses
from lorakit.train.run_folder import RUN_FILE, claim_run_folder
from tests.models import tiny_llama


def dead_pid():
    """The PID of a process that has exited (and was reaped), so no process holds it now."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True)
    return int(child.stdout)


def test_temp_folder_name_holds_the_writers_pid(tmp_path):
    temp = fresh_temp_folder(tmp_path / "adapter", "tmp")
    assert temp.parent == tmp_path and temp.is_dir()
    assert re.fullmatch(rf"\.adapter\.tmp-{os.getpid()}-[0-9a-f]{{8}}", temp.name)
    with pytest.raises(ValueError, match="lowercase letters, got 'TMP-1'"):
        fresh_temp_folder(tmp_path / "adapter", "TMP-1")


def test_stale_temps_are_removed_and_live_ones_kept(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    stale = [f".adapter.tmp-{dead}-0a1b2c3d", f".adapter.old-{dead}-0a1b2c3d", f".tmp-checkpoint-40-{dead}",
             f".partial-merged-{dead}", f".my.run.adapter.tmp-{dead}-deadbeef"]
    live = [f".adapter.tmp-{alive}-0a1b2c3d", f".tmp-checkpoint-40-{alive}", f".partial-merged-{alive}"]
    other = ["adapter", ".git", f".adapter.tmp-{dead}", f"checkpoint-{dead}", ".cache-12-ab"]
    for name in stale + live + other:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_text("x")
    (tmp_path / f".tmp-checkpoint-7-{dead}.txt").write_text("a file, not a writer's folder")
    stale_files = [f".run.json.tmp-{dead}-0a1b2c3d"]  # write_file_atomically's, from a killed writer
    kept_files = [f".run.json.tmp-{alive}-0a1b2c3d", f".run.json.old-{dead}-0a1b2c3d",
                  f".tmp-checkpoint-8-{dead}"]
    for name in stale_files + kept_files:
        (tmp_path / name).write_text("{")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale + stale_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(live + other + kept_files
                                                                + [f".tmp-checkpoint-7-{dead}.txt"])
    assert remove_stale_temps(tmp_path / "nowhere") == []


def test_only_the_named_targets_temps_are_removed(tmp_path):
    dead = dead_pid()
    for name in (f".adapter.tmp-{dead}-0a1b2c3d", f".merged.tmp-{dead}-0a1b2c3d",
                 f".tmp-checkpoint-5-{dead}"):
        (tmp_path / name).mkdir()
    assert [p.name for p in remove_stale_temps(tmp_path, "adapter")] == [f".adapter.tmp-{dead}-0a1b2c3d"]
    assert [p.name for p in remove_stale_temps(tmp_path, "checkpoint-5")] == [f".tmp-checkpoint-5-{dead}"]
    assert [p.name for p in tmp_path.iterdir()] == [f".merged.tmp-{dead}-0a1b2c3d"]


def test_a_pid_of_another_user_counts_as_running(tmp_path, monkeypatch):
    def kill(pid, signal):
        raise PermissionError("not yours")

    monkeypatch.setattr(files.os, "kill", kill)
    (tmp_path / ".adapter.tmp-1-0a1b2c3d").mkdir()
    assert remove_stale_temps(tmp_path) == []
    assert (tmp_path / ".adapter.tmp-1-0a1b2c3d").is_dir()


def test_a_replacement_killed_between_its_renames_gets_the_old_folder_back(tmp_path):
    old = tmp_path / f".adapter.old-{dead_pid()}-0a1b2c3d"
    (old / "adapter").mkdir(parents=True)
    (old / "adapter" / "adapter_config.json").write_text("{}")
    assert remove_stale_temps(tmp_path) == [old]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"


def test_write_folder_atomically_creates_swaps_merges_or_refuses(tmp_path):
    target = tmp_path / "deep" / "out"

    def writer(text):
        def write(folder):
            (folder / "a.txt").write_text(text)
            (folder / "b.txt").write_text(text)
        return write

    write_folder_atomically(target, writer("one"))
    assert (target / "a.txt").read_text() == "one"
    write_folder_atomically(target, writer("two"), replaceable={"a.txt", "b.txt"})  # swapped whole
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    (target / "keep.txt").write_text("mine")
    write_folder_atomically(target, writer("three"), replaceable={"a.txt", "b.txt"},
                            merge_order=["b.txt", "a.txt"])
    assert (target / "a.txt").read_text() == "three" and (target / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match=r"out already exists and holds a.txt, b.txt, keep.txt; choose"):
        write_folder_atomically(target, writer("four"), replaceable=())
    assert (target / "a.txt").read_text() == "three"
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]  # no temporary folder left


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder):
    """Mode bits of `folder` and of everything under it, by path relative to `folder`."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
    return found


def expected_modes(found, mask, folders=(".",)):
    return {path: (0o777 if path in folders else 0o666) & ~mask for path in found}


def test_adapter_files_get_the_umasks_permissions(umask, tmp_path):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, targets=["q_proj"]))
    folder = save_adapter(model, tmp_path / "runs" / "adapter")
    found = modes(folder)
    assert set(found) == {".", "adapter_config.json", "adapter_model.safetensors"}
    assert found == expected_modes(found, umask)  # under umask 022: folder 0755, files 0644
    assert stat.S_IMODE((tmp_path / "runs").stat().st_mode) == 0o777 & ~umask
    save_adapter(model, folder)  # replacing keeps them
    assert modes(folder) == found
    (folder / "optimizer.safetensors").write_text("a checkpoint's other file")
    save_adapter(model, folder)  # files moved in one by one
    assert modes(folder)["adapter_model.safetensors"] == 0o666 & ~umask


def test_merged_model_files_get_the_umasks_permissions(umask, tmp_path):
    def save_pretrained(folder):  # safetensors creates its files 0600, as transformers' save_pretrained does
        save_file({}, str(folder / "model.safetensors"))
        (folder / "sub").mkdir()
        save_file({}, str(folder / "sub" / "part.safetensors"))

    model = SimpleNamespace(config=SimpleNamespace(), hf_quantizer=None, save_pretrained=save_pretrained)
    tokenizer = SimpleNamespace(save_pretrained=lambda folder: (folder / "tokenizer.json").write_text("{}"))
    output = tmp_path / "merged"
    (tmp_path / f".partial-merged-{dead_pid()}").mkdir()  # left by a merge killed before this one
    save_merged(model, tokenizer, output)
    found = modes(output)
    assert set(found) == {".", "model.safetensors", "sub", "sub/part.safetensors", "tokenizer.json"}
    assert found == expected_modes(found, umask, folders=(".", "sub"))
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    with pytest.raises(FileExistsError, match="merged already exists"):
        save_merged(model, tokenizer, output)


def only_names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_file_atomically_creates_and_replaces(tmp_path):
    target = tmp_path / "deep" / "run.json"
    write_file_atomically(target, lambda tmp: tmp.write_text("one"))
    write_file_atomically(target, lambda tmp: tmp.write_text("two"))
    assert target.read_text() == "two"
    assert only_names(tmp_path / "deep") == ["run.json"]
    (tmp_path / "data.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"data.jsonl is a file, not a folder"):
        write_file_atomically(tmp_path / "data.jsonl" / "run.json", lambda tmp: tmp.write_text("x"))


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_file_write_failing_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"GGUF old")
    seen = []

    def fail_midway(tmp):
        seen.append(tmp)
        with tmp.open("wb") as handle:
            handle.write(b"GGUF half of the new ")
        raise error

    with pytest.raises(type(error)):
        write_file_atomically(target, fail_midway)
    assert target.read_bytes() == b"GGUF old"
    assert seen[0].parent == tmp_path and re.fullmatch(rf"\.model\.gguf\.tmp-{os.getpid()}-[0-9a-f]{{8}}",
                                                       seen[0].name)
    assert only_names(tmp_path) == ["model.gguf"]
    with pytest.raises(type(error)):
        write_file_atomically(tmp_path / "new.gguf", fail_midway)
    assert only_names(tmp_path) == ["model.gguf"]  # no file, not even an empty one


def test_written_files_get_the_umasks_mode(umask, tmp_path):
    target = tmp_path / "weights.safetensors"
    write_file_atomically(target, lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))  # safetensors: 0600
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    target.chmod(0o600)
    # the new file's mode, not the old's
    write_file_atomically(target, lambda tmp: tmp.write_text("replaced"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_run_json_is_written_through_the_helper(tmp_path, monkeypatch):
    output = tmp_path / "run"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    config = TrainConfig(data=str(tmp_path / "train.jsonl"), output_dir=str(output))
    real_write_text = Path.write_text

    def disk_full(path, text, *args, **kwargs):
        real_write_text(path, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        claim_run_folder(config, say=lambda message: None)
    assert only_names(output) == ["notes.txt"]  # neither a half run.json nor its temporary file
    monkeypatch.undo()
    folder = claim_run_folder(config, say=lambda message: None)
    assert json.loads((output / RUN_FILE).read_text())["pid"] == os.getpid()
    folder.release()


def test_metrics_trimmed_on_resume_are_kept_when_the_rewrite_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write(kind="train", step=step, loss=1.0)
    before = path.read_text()
    def failing_rename(source, target):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(files.os, "replace", failing_rename)
    with pytest.raises(OSError, match="I/O error"):
        MetricsLog(path, resume_step=2)
    assert path.read_text() == before and only_names(tmp_path) == ["metrics.jsonl"]
    monkeypatch.undo()
    MetricsLog(path, resume_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_the_loss_plot_is_a_png_written_in_one_rename(tmp_path):
    events = [{"kind": "train", "step": step, "loss": 2.0 / step} for step in (1, 2, 3)]
    path = plot_losses(events, tmp_path / "loss.png")
    # the format follows loss.png, not the temporary name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert only_names(tmp_path) == ["loss.png"]
