"""One run per out folder: a lock held for the run (and dropped by the OS when the holder dies), and no new run
over an earlier one unless --overwrite clears it."""

import fcntl
import json
import os
import subprocess
import sys

import pytest

from lorafit.training import loop
from lorafit.training.recipe import train
from lorafit.training.runfolder import LOCK, RunFolderError, run_lock
from tests.conftest import run_cli, tiny_job, tiny_run_config


@pytest.fixture
def job(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tiny_job(tmp_path)


def _config(job, out, *overrides):
    return tiny_run_config(*job, out, "--eval.compare_base", "false", *overrides)


def _hold_lock(out):
    """A separate process that takes out/.lock as a run does and keeps it: (process, its pid as written)."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode()); print('held', flush=True); "
            "time.sleep(120)")
    out.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_on_the_same_out_stops_naming_the_holders_pid_and_a_killed_holder_blocks_nothing(job):
    out = job[0] / "run"
    holder = _hold_lock(out)
    try:
        with pytest.raises(RunFolderError, match=f"another run \\(pid {holder.pid}\\) is using this out folder"):
            train(_config(job, out), log=lambda _: None)
        assert not (out / "metrics.jsonl").exists()  # it stopped before writing anything
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the OS drops the lock with the process
        holder.wait()
    assert train(_config(job, out), log=lambda _: None)["steps"] == 6


def test_the_lock_is_held_while_the_run_lasts_and_released_after(job):
    out = job[0] / "run"
    seen = []

    def log(_):  # called during the run: another open of the lock file cannot take it
        fd = os.open(out / LOCK, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("free")
        except BlockingIOError:
            seen.append((out / LOCK).read_text().strip())
        finally:
            os.close(fd)

    train(_config(job, out), log=log)
    assert seen and set(seen) == {str(os.getpid())}
    with run_lock(out):  # free again
        pass


def test_a_new_run_over_an_earlier_one_is_refused_unless_overwrite_clears_it(job):
    out = job[0] / "run"
    train(_config(job, out), log=lambda _: None)
    stamp = (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    for cfg in (_config(job, out), _config(job, out, "--lora.alpha", "32")):  # the same config re-run, too
        with pytest.raises(RunFolderError, match="holds an earlier run .*pass --resume to continue it, --overwrite"):
            train(cfg, log=lambda _: None)
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    said = []
    train(_config(job, out, "--lora.alpha", "32"), overwrite=True, log=said.append)
    assert any(line.startswith("--overwrite: cleared the earlier run") for line in said)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4,
                                                                                                        5, 6]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 32


def test_an_overwritten_run_killed_before_its_first_save_cannot_resume_the_older_one(job, monkeypatch):
    out = job[0] / "run"
    train(_config(job, out), log=lambda _: None)

    def killed(name, step=None):
        if name == "step" and step == 1:
            raise KeyboardInterrupt  # stands in for a kill before the first checkpoint
    monkeypatch.setattr(loop, "kill_point", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_config(job, out, "--lora.alpha", "32"), overwrite=True, log=lambda _: None)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_config(job, out, "--lora.alpha", "32"), resume=True, log=lambda _: None)


def test_conflicting_flags_are_refused(job):
    out = job[0] / "run"
    with pytest.raises(RunFolderError, match="pass one of them"):
        train(_config(job, out), resume=True, overwrite=True, log=lambda _: None)
    with pytest.raises(RunFolderError, match="--force only applies to --resume"):
        train(_config(job, out), force=True, log=lambda _: None)


def test_leftover_temp_files_are_removed_when_a_run_starts(job):
    out = job[0] / "run"
    (out / "checkpoints" / ".tmp-0badc0de").mkdir(parents=True)
    (out / ".results.json.1234abcd.tmp").touch()
    said = []
    train(_config(job, out), overwrite=True, log=said.append)
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob("*.tmp"))
    assert any("removed 1 temp file(s)" in line for line in said)  # the checkpoints folder went with --overwrite


def test_the_train_command_says_in_one_line_that_the_folder_is_locked(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"data": {"train": str(tmp_path / "train.jsonl")}, "out": str(out)}))
    (tmp_path / "train.jsonl").write_text('{"text": "cat"}\n')
    with run_lock(out):
        done = run_cli("train", str(config), "--resume", "--force")  # (tests/faults runs it with --overwrite)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == f"error: {out}: another run (pid {os.getpid()}) is using this out folder; wait " \
                                  "for it to finish, or pass another --out"
