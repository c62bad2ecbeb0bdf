"""The `lorafit` command, run as a real subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}


def lorafit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lorafit", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


def test_reproduce_flip_writes_its_outputs(tmp_path):
    done = lorafit("reproduce", "flip", "--out", str(tmp_path), "--base-epochs", "3", "--tune-epochs", "2")
    assert done.returncode == 0, done.stderr
    assert "| lora |" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"base", "lora", "full", "last_layer"}
    assert (tmp_path / "flip.png").is_file()
    shown = lorafit("inspect", str(tmp_path / "adapter"))
    assert shown.returncode == 0 and "3,368 parameters" in shown.stderr


def test_user_mistakes_are_one_clear_line_and_exit_2(tmp_path):
    done = lorafit("reproduce", "flip", "--flip", "diagonal", "--out", str(tmp_path))
    assert done.returncode == 2 and "error: flip must be 'lr' or 'ud'" in done.stderr
    assert "Traceback" not in done.stderr
    done = lorafit("inspect", str(tmp_path))
    assert done.returncode == 2 and "adapter_config.json: not found" in done.stderr


def tiny_run_config(tmp_path) -> Path:
    """A saved tiny model, instruction data and a 3-step config writing to tmp_path/run: the config's path."""
    from test_models import saved_tiny_model

    model = saved_tiny_model(tmp_path / "model")
    rows = [{"instruction": f"{a} {b}", "input": "", "output": b} for a in ("cat", "dog") for b in ("hello", "world")]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 3) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  name: {model}\ndata:\n  train: train.jsonl\n  val_fraction: 0.25\n"
                      f"lora:\n  targets: all-linear\ntrain:\n  steps: 3\n  batch_size: 2\nout: {tmp_path / 'run'}\n")
    return config


def test_train_eval_merge_generate_end_to_end_on_a_tiny_model(tmp_path):
    config = tiny_run_config(tmp_path)
    done = lorafit("train", str(config), "--train.lr", "1e-2", "--eval.max_new_tokens", "2", "--precision", "fp32")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["precision"] == "fp32"
    assert "with adapter" in done.stdout and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    done = lorafit("eval", str(config))
    assert done.returncode == 0 and "run" in done.stdout and "base" in done.stdout, done.stderr
    done = lorafit("merge", "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), done.stderr
    done = lorafit("generate", "--model", str(tmp_path / "merged"), "--max-new-tokens", "3", "cat hello")
    assert done.returncode == 0 and done.stdout.startswith("[base] "), done.stderr
    done = lorafit("train", str(config), "--lora.rank", "4")
    assert done.returncode == 2 and "lora.rank: unknown key" in done.stderr
    done = lorafit("analyze", str(tmp_path / "run" / "adapter"), "--no-base", "--out", str(tmp_path / "analyze"))
    assert done.returncode == 0 and "## ΔW spectra" in done.stdout, done.stderr
    assert (tmp_path / "analyze" / "spectra.png").is_file()


def test_plan_prints_the_talks_gpt2_medium_line_and_writes_its_report(tmp_path):
    done = lorafit("plan", "gpt2-medium", "--r", "8", "--targets", "c_attn", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "trainable params: 786,432 || all params: 355,609,600 || trainable%: 0.2212"
    assert {p.name for p in tmp_path.iterdir()} == {"plan.json", "plan.md", "plan.png"}
    done = lorafit("plan", "gpt2-medium", "--targets", "no_such_module", "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and "no_such_module" in done.stderr and "Traceback" not in done.stderr


def test_chat_streams_turns_with_history_and_matches_generate(tmp_path):
    from test_models import saved_tiny_model

    model = str(saved_tiny_model(tmp_path / "model"))
    one = lorafit("generate", "--model", model, "--max-new-tokens", "4", "cat hello")
    assert one.returncode == 0, one.stderr
    chat = subprocess.run([sys.executable, "-m", "lorafit", "chat", "--model", model, "--max-new-tokens", "4"],
                          input="cat hello\ndog world\n\n", capture_output=True, text=True, env=ENV, timeout=300)
    assert chat.returncode == 0, chat.stderr
    turns = chat.stdout.split("model> ")
    assert len(turns) == 3 and turns[0] == "you> "  # two answers, then the empty line ends the chat
    assert turns[1].split("\n")[0] == one.stdout.removeprefix("[base] ").rstrip("\n")  # same greedy answer
    assert turns[2].endswith("you> ")


@pytest.mark.slow
def test_real_smollm2_preset_trains_merges_and_reloads(tmp_path):
    """A few steps on the shipped WordNet data with the real preset, then merge and reload with transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit.generate import load_with_adapters

    example = Path(__file__).parents[1] / "examples" / "smollm2-wordnet.yaml"
    done = lorafit("train", str(example), "--out", str(tmp_path / "run"), "--train.steps", "3",
                   "--train.batch_size", "2", "--eval.limit", "4", "--eval.max_new_tokens", "4", "--eval.samples", "1")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["base"]["metric"] == "exact_match" and results["tuned"]["loss"] < results["base"]["loss"]
    adapter = tmp_path / "run" / "adapter"
    done = lorafit("merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr

    net, tokenizer, _ = load_with_adapters(None, [str(adapter)])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = tokenizer(["the organ of sight", "a male with the same parents"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, net(**ids).logits, rtol=0, atol=1e-3)
