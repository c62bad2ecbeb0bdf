"""Checked resumes: a checkpoint records the run's config and data; --resume refuses a different run (naming the
keys), and --force accepts only the keys that change no step's maths."""

import json
import shutil

import pytest

from lorafit.training.config import load_run_config
from lorafit.training.fingerprint import differences, fingerprint, harmless
from lorafit.training.recipe import train
from lorafit.training.runfolder import RunFolderError
from tests.conftest import tiny_job, tiny_run_config


@pytest.fixture
def trained(tmp_path, monkeypatch, one_thread):
    """A finished 6-step tiny run in tmp_path/run: (job folder, model folder, out)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job, model = tiny_job(tmp_path)
    out = tmp_path / "run"
    train(_config(job, model, out), log=lambda _: None)
    return job, model, out


def _config(job, model, out, *overrides):
    return tiny_run_config(job, model, out, "--eval.compare_base", "false", *overrides)


@pytest.mark.parametrize("force", [False, True])
def test_resume_refuses_a_changed_rank_or_learning_rate_even_with_force(trained, force):
    job, model, out = trained
    cfg = _config(job, model, out, "--lora.r", "4", "--train.lr", "2e-2")
    with pytest.raises(RunFolderError, match=r"different run \(lora.r: 8 -> 4; train.lr: 0.01 -> 0.02\)"):
        train(cfg, resume=True, force=force, log=lambda _: None)


def test_resume_refuses_changed_data_contents(trained):
    job, model, out = trained
    with (job / "train.jsonl").open("a") as file:
        file.write(json.dumps({"instruction": "cat cat", "input": "", "output": "dog"}) + "\n")
    with pytest.raises(RunFolderError, match="data.train: contents changed"):
        train(_config(job, model, out), resume=True, force=True, log=lambda _: None)


def test_force_accepts_more_steps_and_other_harmless_keys_and_the_run_goes_on(trained):
    job, model, out = trained
    cfg = _config(job, model, out, "--train.steps", "8", "--train.log_every", "2", "--eval.limit", "4")
    with pytest.raises(RunFolderError, match="train.steps: 6 -> 8.*pass --force"):
        train(cfg, resume=True, log=lambda _: None)
    said = []
    report = train(cfg, resume=True, force=True, log=said.append)
    assert any(line.startswith("--force: continuing with eval.limit: null -> 4") for line in said)
    assert report["steps"] == 8
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))


def test_the_same_config_resumes_without_force(trained):
    job, model, out = trained
    said = []
    train(_config(job, model, out), resume=True, log=said.append)
    assert any(line.startswith("resumed from") and line.endswith("step-000006 at step 6") for line in said)


def test_the_fingerprint_ignores_where_the_data_is_but_not_what_it_says(tmp_path):
    job, model = tiny_job(tmp_path)
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        shutil.copy(job / name, moved / name)
    args = ["--model.name", str(model), "--data.format", "instruction"]
    here = load_run_config(None, [*args, "--data.train", str(job / "train.jsonl"), "--out", "a"])
    there = load_run_config(None, [*args, "--data.train", str(moved / "train.jsonl"), "--out", "b"])
    assert differences(fingerprint(here), fingerprint(there)) == {}
    assert set(fingerprint(here)["data"]) == {"data.train"}  # no validation file: none fingerprinted


def test_only_keys_that_change_no_steps_maths_are_harmless():
    assert all(map(harmless, ["train.steps", "train.save_every", "train.log_every", "train.tensorboard",
                              "eval.metric", "eval.limit"]))
    assert not any(map(harmless, ["train.lr", "train.seed", "train.batch_size", "train.grad_accum",
                                  "train.precision", "train.warmup_steps", "lora.r", "lora.alpha", "model.name",
                                  "method.name", "data.max_length", "data.train", "evaluation.x"]))
