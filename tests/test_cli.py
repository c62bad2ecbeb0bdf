"""The `lorafit` command, run as a real subprocess."""

import json

import pytest

from tests.conftest import REPO, run_cli, saved_tiny_model, tiny_run_yaml


@pytest.mark.slow
def test_reproduce_flip_writes_its_outputs(tmp_path):
    done = run_cli("reproduce", "flip", "--out", str(tmp_path), "--base-epochs", "3", "--tune-epochs", "2")
    assert done.returncode == 0, done.stderr
    assert "| lora |" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"base", "lora", "full", "last_layer"}
    assert (tmp_path / "flip.png").is_file()
    shown = run_cli("inspect", str(tmp_path / "adapter"))
    assert shown.returncode == 0 and "3,368 parameters" in shown.stderr


def test_user_mistakes_are_one_clear_line_and_exit_2(tmp_path):
    done = run_cli("reproduce", "flip", "--flip", "diagonal", "--out", str(tmp_path))
    assert done.returncode == 2 and "error: flip must be 'lr' or 'ud'" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_cli("inspect", str(tmp_path))
    assert done.returncode == 2 and "adapter_config.json: not found" in done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: ")


def test_debug_and_lorafit_debug_show_the_traceback(tmp_path):
    (tmp_path / "f").write_text("a file where the output folder should go")
    done = run_cli("plan", "gpt2", "--out", str(tmp_path / "f" / "plan"))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
    assert "a file stands where a folder is needed" in done.stderr
    for args, env in ((["--debug"], None), ([], {"LORAFIT_DEBUG": "1"})):
        done = run_cli(*args, "plan", "gpt2", "--out", str(tmp_path / "f" / "plan"), env=env)
        assert done.returncode == 1 and "Traceback" in done.stderr and "NotADirectoryError" in done.stderr


@pytest.mark.slow
def test_train_eval_merge_generate_end_to_end_on_a_tiny_model(tmp_path):
    config = tiny_run_yaml(tmp_path)
    done = run_cli("train", str(config), "--train.lr", "1e-2", "--eval.max_new_tokens", "2", "--precision", "fp32")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["precision"] == "fp32"
    assert "with adapter" in done.stdout and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    done = run_cli("eval", str(config))
    assert done.returncode == 0 and "run" in done.stdout and "base" in done.stdout, done.stderr
    done = run_cli("merge", "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), done.stderr
    done = run_cli("generate", "--model", str(tmp_path / "merged"), "--max-new-tokens", "3", "cat hello")
    assert done.returncode == 0 and done.stdout.startswith("[base] "), done.stderr
    done = run_cli("train", str(config), "--lora.rank", "4")
    assert done.returncode == 2 and done.stderr == "error: --lora.rank: unknown key; did you mean --lora.r?\n"
    done = run_cli("analyze", str(tmp_path / "run" / "adapter"), "--no-base", "--out", str(tmp_path / "analyze"))
    assert done.returncode == 0 and "## ΔW spectra" in done.stdout, done.stderr
    assert (tmp_path / "analyze" / "spectra.png").is_file()


def test_plan_prints_the_talks_gpt2_medium_line_and_writes_its_report(tmp_path):
    done = run_cli("plan", "gpt2-medium", "--r", "8", "--targets", "c_attn", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "trainable params: 786,432 || all params: 355,609,600 || trainable%: 0.2212"
    assert {p.name for p in tmp_path.iterdir()} == {"plan.json", "plan.md", "plan.png"}
    done = run_cli("plan", "gpt2-medium", "--targets", "no_such_module", "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and "no_such_module" in done.stderr and "Traceback" not in done.stderr


def test_chat_streams_turns_with_history_and_matches_generate(tmp_path):
    model = str(saved_tiny_model(tmp_path / "model"))
    one = run_cli("generate", "--model", model, "--max-new-tokens", "4", "cat hello")
    assert one.returncode == 0, one.stderr
    chat = run_cli("chat", "--model", model, "--max-new-tokens", "4", input="cat hello\ndog world\n\n")
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

    from lorafit.inference.generate import load_with_adapters

    example = REPO / "examples" / "smollm2-wordnet.yaml"
    done = run_cli("train", str(example), "--out", str(tmp_path / "run"), "--train.steps", "3",
                    "--train.batch_size", "2", "--eval.limit", "4", "--eval.max_new_tokens", "4", "--eval.samples", "1")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["base"]["metric"] == "exact_match" and results["tuned"]["loss"] < results["base"]["loss"]
    adapter = tmp_path / "run" / "adapter"
    done = run_cli("merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr

    net, tokenizer, _ = load_with_adapters(None, [str(adapter)])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = tokenizer(["the organ of sight", "a male with the same parents"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, net(**ids).logits, rtol=0, atol=1e-3)


def test_adapter_saved_from_a_model_folder_records_its_base_and_merges_without_model(tmp_path):
    """save_adapter on a model loaded from a folder records that folder, as PEFT records model.name_or_path, so
    `lorafit merge --adapter DIR` finds the base by itself."""
    from transformers import AutoModelForCausalLM

    import lorafit as lf

    folder = saved_tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    lf.inject(model, lf.LoraConfig(r=2, targets=["q_proj"]))
    lf.save_adapter(model, tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(folder)
    done = run_cli("merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "merged" / "config.json").is_file()


def test_models_prints_preset_names_whole_in_a_pipe():
    """In a pipe (80 columns by default) and in a narrow terminal, every preset name prints whole: users copy it."""
    from lorafit.models import PRESETS

    for columns in ("80", "50"):
        done = run_cli("models", env={"COLUMNS": columns}, timeout=120)
        assert done.returncode == 0, done.stderr
        for name in PRESETS:
            assert name in done.stdout, f"{name!r} cut at {columns} columns:\n{done.stdout}"
