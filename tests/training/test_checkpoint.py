"""Checkpoints: nothing is deleted before its replacement is in place, a resume finds the newest complete one,
leftovers of killed writes are removed, and a failed write leaves the previous checkpoint as it was."""

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors import SafetensorError
from torch import nn

from lorafit.training import checkpoint
from lorafit.training.checkpoint import (
    CheckpointWriteError,
    clean_temp,
    load_checkpoint,
    read_state,
    resume_point,
    save_checkpoint,
)


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(folder, step, seed=0):
    model, optimizer = _model_and_optimizer(seed)
    state = {"step": step, "micro_batches": 2 * step, "seconds": 1.0}
    return save_checkpoint(folder, model, optimizer, state, fingerprint={"config": {"lora.r": 8}, "data": {}})


def _weight(path):
    model, optimizer = _model_and_optimizer(seed=99)
    load_checkpoint(path, model, optimizer)
    return model.weight.detach().clone()


def test_saving_a_step_again_keeps_the_old_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    _save(folder, 3)
    _save(folder, 6, seed=1)
    before = _weight(folder / "step-000006")
    real_replace = os.replace

    def replace(src, dst):  # the rename of the new step-6 into place fails (a kill would stop here too)
        if os.path.basename(dst) == "step-000006" and os.path.basename(src).startswith(".tmp-"):
            raise OSError(errno.EIO, "simulated failure of the final rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        _save(folder, 6, seed=2)
    monkeypatch.setattr(os, "replace", real_replace)
    path = resume_point(folder)
    assert path == folder / "step-000006"  # not "no checkpoint": either the old step-6 or step-3 survives
    torch.testing.assert_close(_weight(path), before, atol=0, rtol=0)


def test_saving_a_step_again_replaces_it(tmp_path):
    folder = tmp_path / "checkpoints"
    _save(folder, 6, seed=1)
    _save(folder, 6, seed=2)
    torch.testing.assert_close(_weight(folder / "step-000006"), _model_and_optimizer(2)[0].weight.detach())
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-000006"]


def test_resume_falls_back_to_the_newest_complete_checkpoint_and_says_so(tmp_path):
    folder = tmp_path / "checkpoints"
    _save(folder, 3)
    _save(folder, 6)
    shutil.copytree(folder / "step-000006", folder / ".tmp-abcd1234")  # a complete temp folder, never renamed
    shutil.rmtree(folder / "step-000006")  # latest.json names a missing folder
    said = []
    assert resume_point(folder, said.append) == folder / "step-000003"
    assert "step-000006, which is missing or incomplete; using step-000003" in said[0]


def test_an_incomplete_step_folder_is_never_resumed(tmp_path):
    folder = tmp_path / "checkpoints"
    _save(folder, 3)
    _save(folder, 6)
    (folder / "step-000006" / "state.json").unlink()  # state.json is written last: without it, incomplete
    assert resume_point(folder, lambda _: None) == folder / "step-000003"


def test_without_latest_json_the_newest_complete_checkpoint_is_used(tmp_path):
    folder = tmp_path / "checkpoints"
    _save(folder, 3)
    (folder / "latest.json").unlink()  # killed after the first rename, before latest.json was written
    said = []
    assert resume_point(folder, said.append) == folder / "step-000003"
    assert "no latest.json" in said[0]
    assert resume_point(tmp_path / "nothing", said.append) is None


def test_old_checkpoints_and_ones_past_the_saved_step_are_pruned(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        _save(folder, step)
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-000006", "step-000009"]
    _save(folder, 7)  # resumed from an earlier step: step-9 belongs to an abandoned future
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-000006", "step-000007"]
    assert json.loads((folder / "latest.json").read_text())["checkpoint"] == "step-000007"


def test_clean_temp_removes_temp_folders_and_zero_byte_temp_files(tmp_path):
    (tmp_path / ".tmp-1234abcd").mkdir()
    (tmp_path / ".tmp-1234abcd" / "trainable.safetensors").write_bytes(b"x")
    (tmp_path / ".latest.json.9f8e7d6c.tmp").touch()
    (tmp_path / "step-000003").mkdir()
    assert [p.name for p in clean_temp(tmp_path)] == [".tmp-1234abcd", ".latest.json.9f8e7d6c.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000003"]


def test_a_checkpoint_takes_the_umask(tmp_path):
    before = os.umask(0o022)
    try:
        path = _save(tmp_path / "checkpoints", 3)
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in path.iterdir()} == {0o644}


def test_a_checkpoint_records_the_run_fingerprint(tmp_path):
    path = _save(tmp_path / "checkpoints", 3)
    assert read_state(path)["fingerprint"] == {"config": {"lora.r": 8}, "data": {}}
    model, optimizer = _model_and_optimizer()
    assert load_checkpoint(path, model, optimizer) == {"step": 3, "micro_batches": 6, "seconds": 1.0}


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")])
def test_a_full_disk_leaves_the_previous_checkpoint_named_and_nothing_half_written(tmp_path, monkeypatch, error):
    folder = tmp_path / "checkpoints"
    _save(folder, 3)
    before = _weight(folder / "step-000003")

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint, "save_file", full)  # what safetensors raises on a full disk
    with pytest.raises(CheckpointWriteError, match="step-000006: could not write the checkpoint") as caught:
        _save(folder, 6)
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-000003"]
    torch.testing.assert_close(_weight(resume_point(folder)), before, atol=0, rtol=0)


def _pissa_loraplus(seed: int):
    """A model with a pissa_niter adapter (its residual base comes from a random sketch) and a LoRA+ optimizer."""
    import lorafit
    from lorafit.training.optim import make_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    torch.manual_seed(seed)  # the adapter must not depend on the RNG state at injection
    lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["0", "2"], bias="all", init="pissa_niter_1"))
    return model, make_optimizer(model, lr=1e-2, weight_decay=0.1, loraplus_lr_ratio=16.0)


def _step(model, optimizer, seed):
    model(torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_a_loraplus_optimizer_and_a_pissa_niter_base_resume_to_the_same_next_step(tmp_path):
    model, optimizer = _pissa_loraplus(seed=1)
    _step(model, optimizer, 0)
    path = save_checkpoint(tmp_path, model, optimizer, {"step": 1, "micro_batches": 1, "seconds": 0.0})
    resumed, resumed_optimizer = _pissa_loraplus(seed=2)
    load_checkpoint(path, resumed, resumed_optimizer)
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [1e-2, 16e-2, 16e-2]
    for m, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        _step(m, opt, 1)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
