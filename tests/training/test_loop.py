"""The training loop saves each step at most once: the last step, when it is also on the save_every schedule,
is not written a second time (the second write is what once deleted step-N before its copy was in place); Ctrl-C
stops it at a step boundary with a checkpoint."""

import re
import signal
import subprocess
import sys
import time

import pytest

from lorafit.training import loop
from lorafit.training.recipe import train
from tests.conftest import CLI_ENV, tiny_job, tiny_run_args, tiny_run_config


def test_the_last_step_is_saved_once(tmp_path, monkeypatch, one_thread):
    saved = []
    real = loop.save_checkpoint

    def spy(folder, model, optimizer, state, **kwargs):
        saved.append(state["step"])
        return real(folder, model, optimizer, state, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", spy)
    job, model = tiny_job(tmp_path)
    train(tiny_run_config(job, model, tmp_path / "run", "--eval.compare_base", "false"), log=lambda _: None)
    assert saved == [3, 6]  # steps 6, save_every 3
    train(tiny_run_config(job, model, tmp_path / "run", "--train.steps", "7", "--eval.compare_base", "false"),
          overwrite=True, log=lambda _: None)
    assert saved == [3, 6, 3, 6, 7]  # a last step off the schedule gets its own checkpoint


@pytest.mark.slow
def test_ctrl_c_stops_at_the_next_step_with_a_checkpoint_and_its_echo_is_not_a_second_one(tmp_path):
    """Two SIGINTs a moment apart (a terminal's Ctrl-C, and torchrun forwarding it to its processes) stop the run
    at the next step boundary with a checkpoint, exit code 130; they do not abort the step."""
    job, model = tiny_job(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("out: unused\n")
    command = [sys.executable, "-m", "lorafit", "train", str(config),
               *tiny_run_args(job, model, "--out", str(tmp_path / "run"), "--train.steps", "100000",
                              "--train.save_every", "0", "--train.grad_accum", "40", "--eval.compare_base", "false")]
    proc = subprocess.Popen(command, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while not re.search(r"\| [1-9]\d*/100000", seen):  # a step is done: the loop (and its handler) is running
        seen += proc.stderr.read(1) or pytest.fail(f"the run ended before training: {seen[-2000:]}")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # within a step (40 micro-batches): without the echo rule, this one would abort the step
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, -signal.SIGINT), err[-2000:]  # -SIGINT: the echo landed after the loop ended
    step = int(re.search(r"interrupted at step (\d+)", err).group(1))
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:06d}" / "state.json").is_file()
