"""A full disk while a checkpoint is written: the run stops with one OSError naming the checkpoint, nothing is left
half-written, the previous checkpoint stays named and loadable, and --resume (space freed) ends with the same
adapter as a run that never failed."""

import errno
import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from lorafit.training import checkpoint
from lorafit.training.checkpoint import CheckpointWriteError, resume_point
from lorafit.training.recipe import train
from tests.conftest import tiny_job, tiny_run_config

RUN = ("--eval.compare_base", "false", "--eval.limit", "2")  # 6 steps, checkpoints at 3 and 6


@pytest.fixture
def job(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tiny_job(tmp_path)


def _adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_stopped_cleanly_then_resumes(job, out, caught, free_space=lambda: None):
    """What a full disk at step 6 must leave, and a resume (once `free_space` made room) to the uninterrupted run's
    adapter."""
    assert caught.errno == errno.ENOSPC and "\n" not in str(caught)
    assert f"{out / 'checkpoints' / 'step-000006'}: could not write the checkpoint (No space left" in str(caught)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step-000003"]
    assert resume_point(out / "checkpoints") == out / "checkpoints" / "step-000003"
    assert not (out / "adapter").exists()
    free_space()
    train(tiny_run_config(*job, out, *RUN), resume=True, log=lambda _: None)  # the lock was released, too
    reference = job[0] / "reference"
    train(tiny_run_config(*job, reference, *RUN), log=lambda _: None)
    for name, tensor in _adapter(reference).items():
        assert torch.equal(_adapter(out)[name], tensor), name
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4,
                                                                                                        5, 6]


def test_enospc_in_a_checkpoint_write_keeps_the_previous_checkpoint(job, monkeypatch):
    out = job[0] / "run"
    real, calls = checkpoint.save_file, []

    def fills_up(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)  # the second checkpoint (step 6) finds the disk full
    with pytest.raises(CheckpointWriteError) as caught:
        train(tiny_run_config(*job, out, *RUN), log=lambda _: None)
    monkeypatch.undo()
    _assert_stopped_cleanly_then_resumes(job, out, caught.value)


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs at tmp_path/run/checkpoints: room for one tiny checkpoint (~210 KB), not two. Root only."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs",
                                                         str(folder)], capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: the failed torch.save's file may be open


def test_a_real_full_disk_keeps_the_previous_checkpoint(job, small_disk):
    out = small_disk.parent
    with pytest.raises(CheckpointWriteError) as caught:  # safetensors or torch.save fails: neither raises OSError
        train(tiny_run_config(*job, out, *RUN), log=lambda _: None)

    def grow():  # a checkpoint write needs room for two: the new one is in place before the old one goes
        subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)
    _assert_stopped_cleanly_then_resumes(job, out, caught.value, grow)
