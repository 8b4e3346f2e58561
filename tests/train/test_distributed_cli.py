"""`lorakit train --nproc 2`: the command starts its ranks under torchrun; rank 0 alone prints and writes;
kill -9 of the whole job, then --resume, gives the uninterrupted adapter. (What each rank's command does to
the end, rank 0 alone reporting, is tested on forked ranks in test_distributed.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.main import main
from tests.train.helpers import tiny_model_and_tokenizer, write_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_global_batch_that_does_not_split_over_nproc_is_one_line_before_any_process(tmp_path, capsys):
    data = write_data(tmp_path)
    code = main(["train", "--nproc", "2", "--data", str(data), "--batch-size", "4",
                 "--global-batch-size", "12", "--output-dir", str(tmp_path / "out")])
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert error == ("lorakit train: error: global_batch_size=12 does not split over 2 rank(s) x "
                     "batch_size 4: give a multiple of 8, or change batch_size")


def test_the_distributed_section_of_a_yaml_file_and_the_flags_meet(tmp_path):
    from lorakit.cli.main import build_parser
    from lorakit.cli.train_cmd import command_line, settings

    config = tmp_path / "run.yaml"
    config.write_text("data: x.jsonl\ndistributed:\n  strategy: fsdp\n  backend: gloo\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--nproc", "4", "--r", "8", "--pack"])
    values = settings(args)
    assert values["distributed"] == {"strategy": "fsdp", "backend": "gloo", "nproc": 4}
    assert command_line(args) == ["train", "--config", str(config), "--pack", "--r", "8", "--nproc", "4"]
    with pytest.raises(ValueError, match="unknown distributed setting.*stratgy; known: strategy, nproc"):
        from lorakit.train import TrainConfig

        TrainConfig.from_dict({"data": "x", "distributed": {"stratgy": "ddp"}})


def test_nproc_starts_the_ranks_and_kill_9_of_the_whole_job_then_resume_gives_the_uninterrupted_adapter(
        model_dir, tmp_path):
    import psutil

    data = write_data(tmp_path)

    def command(out: str, *extra: str) -> list[str]:
        return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / out),
                "--max-steps", "16", "--r", "2", "--dropout", "0", "--batch-size", "2",
                "--global-batch-size", "8", "--max-length", "32", "--save-every", "2",
                "--no-progress", *extra]

    # `lorakit train --nproc 2` starts 2 ranks under torchrun (gloo); SIGKILL to the launcher's process
    # group as soon as a checkpoint is on disk. torchrun starts each rank in a session of its own, out of
    # that group: the ranks must end with it. (One job for both: starting ranks costs far more than these
    # steps.)
    with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
        job = subprocess.Popen([sys.executable, "-m", "lorakit", *command("killed", "--nproc", "2")],
                               cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 170
        while not (tmp_path / "killed" / "checkpoint-2").is_dir() and job.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        everyone = psutil.Process(job.pid).children(recursive=True)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    _, alive = psutil.wait_procs(everyone, timeout=30)
    assert not alive, [p.cmdline()[-4:] for p in alive]
    killed = tmp_path / "killed"
    assert (killed / "checkpoint-2").is_dir(), (tmp_path / "err.txt").read_text()[-2000:]
    assert not (killed / "adapter").exists()  # it really was cut short
    # The ranks ran with the command's settings, and rank 0 alone printed and wrote (the ranks run
    # unbuffered).
    printed = (tmp_path / "out.txt").read_text()
    assert printed.count("ddp on 2 ranks (cpu): 2 rows x 2 micro-batch(es) x 2 ranks = 8 rows per step") == 1
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]  # (the kill may tear the last)
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1))  # each step once: one writer

    assert main(command("killed", "--resume")) == 0  # one process, the same global batch (2 rows x 4)
    assert main(command("straight")) == 0
    resumed = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in straight:  # float32: the ranks sum their gradients in another order than one process
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-4)
