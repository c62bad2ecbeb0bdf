"""The training recipe on a tiny local model: it learns, writes its outputs, and resumes exactly."""

import json

import pytest
from safetensors.torch import load_file
from test_models import saved_tiny_model

from lorafit.runconfig import load_run_config
from lorafit.train import train

WORDS = ["hello", "world", "cat", "dog"]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = saved_tiny_model(tmp_path / "model")
    rows = [{"instruction": f"{a} {b}", "input": "", "output": b} for a in WORDS for b in WORDS] * 2
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:8]) + "\n")
    return tmp_path, model


def config(tmp_path, model, out, *extra):
    overrides = ["--model.name", str(model), "--data.train", str(tmp_path / "train.jsonl"),
                 "--data.validation", str(tmp_path / "val.jsonl"), "--data.format", "instruction",
                 "--lora.targets", "all-linear", "--lora.dropout", "0.1", "--train.steps", "6",
                 "--train.batch_size", "4", "--train.grad_accum", "2", "--train.lr", "1e-2", "--train.warmup_steps",
                 "2", "--train.save_every", "3", "--eval.max_new_tokens", "2", "--out", str(out), *extra]
    return load_run_config(None, overrides)


def test_run_learns_and_writes_adapter_metrics_and_plot(setup):
    tmp_path, model = setup
    report = train(config(tmp_path, model, tmp_path / "run", "--train.steps", "12"), log=lambda _: None)
    out = tmp_path / "run"
    assert report["tuned"]["loss"] < report["base"]["loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)) and "eval_loss" in rows[-1]
    assert json.loads((out / "results.json").read_text())["steps"] == 12


def test_resume_from_a_checkpoint_ends_with_the_same_adapter(setup):
    tmp_path, model = setup
    train(config(tmp_path, model, tmp_path / "a"), log=lambda _: None)
    train(config(tmp_path, model, tmp_path / "b"), log=lambda _: None)
    checkpoints = tmp_path / "b" / "checkpoints"  # pretend the run was killed right after step 3
    (checkpoints / "latest.json").write_text(json.dumps({"checkpoint": "step-000003", "step": 3}))
    train(config(tmp_path, model, tmp_path / "b"), resume=True, log=lambda _: None)
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key


def test_resume_without_checkpoint_is_a_clear_error(setup):
    tmp_path, model = setup
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(config(tmp_path, model, tmp_path / "c"), resume=True, log=lambda _: None)
