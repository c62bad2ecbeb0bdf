"""The `lorafit` command, run as a real subprocess (in-process where a test watches what a command sends)."""

import json

import pytest
import torch

import lorafit
from lorafit.core.combine import CombineSpec, combine, read_input
from tests.conftest import (
    REPO,
    randomize_lora,
    run_cli,
    saved_tiny_model,
    tiny_classifier_adapter,
    tiny_generator_adapter,
    tiny_llama,
    tiny_run_yaml,
    tiny_tokenizer,
)


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
    """A few steps on the shipped WordNet data with the real preset, then merge and reload with transformers.

    The merge is `lorafit merge`'s own two calls (load_with_adapters, save_merged), in this process: the command
    around them is tested on a tiny model, and each load of the real preset's GGUF file costs seconds."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit.inference.generate import load_with_adapters
    from lorafit.models import save_merged

    example = REPO / "examples" / "smollm2-wordnet.yaml"
    done = run_cli("train", str(example), "--out", str(tmp_path / "run"), "--train.steps", "3",
                    "--train.batch_size", "2", "--eval.limit", "4", "--eval.max_new_tokens", "4", "--eval.samples", "1")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["base"]["metric"] == "exact_match" and results["tuned"]["loss"] < results["base"]["loss"]
    adapter = tmp_path / "run" / "adapter"

    net, tokenizer, _ = load_with_adapters(None, [str(adapter)])
    ids = tokenizer(["the organ of sight", "a male with the same parents"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = net(**ids).logits
    save_merged(net, tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, expected, rtol=0, atol=1e-3)


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


def test_a_classifier_adapter_predicts_labels_and_generate_points_to_predict(tmp_path):
    adapter = str(tiny_classifier_adapter(tmp_path))
    done = run_cli("generate", "--adapter", adapter, "cat hello")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "lorafit predict --adapter" in done.stderr
    done = run_cli("predict", "--adapter", adapter, "cat hello", "dog")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in lines] == ["cat hello", "dog"] and list(lines[0]["probabilities"]) == [
        "animal", "greeting", "other"]
    (tmp_path / "in.txt").write_text("cat hello\n\ndog world\nhello\n")
    done = run_cli("predict", "--adapter", adapter, "--input", str(tmp_path / "in.txt"), "--output",
                   str(tmp_path / "out.csv"))
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "out.csv").read_text().splitlines()
    assert table[0] == "text,label,p(animal),p(greeting),p(other)" and len(table) == 4


def test_eval_of_a_classifier_reports_per_class_scores_and_writes_predictions_and_confusion(tmp_path):
    adapter = str(tiny_classifier_adapter(tmp_path))
    rows = [f"{a} {b},{label}" for a, label in (("cat", "animal"), ("hello", "greeting"), ("world", "other"))
            for b in ("dog", "world", "hello")]
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "run.yaml").write_text(f"model: {{name: {tmp_path / 'encoder'}, task: classification}}\n"
                                       "data: {train: train.csv, validation: train.csv}\n")
    done = run_cli("eval", str(tmp_path / "run.yaml"), "--adapter", adapter, "--report", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    assert "## classifier: per class (3 classes" in done.stdout and "| greeting |" in done.stdout
    names = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert names == ["confusion-base.png", "confusion-classifier.png", "eval.json", "predictions-base.jsonl",
                     "predictions-classifier.jsonl"]
    first = json.loads((tmp_path / "eval" / "predictions-classifier.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text", "label", "prediction", "probabilities"} and first["text"] == "cat dog"
    scores = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert [len(r["confusion"]) for r in scores] == [3, 3] and "predictions" not in scores[0]


def test_generate_and_chat_lay_the_users_text_out_as_the_training_rows_were(tmp_path, monkeypatch):
    """In-process, watching the prompts sent: with the record, generate and the first chat turn send a training
    row's prompt; --raw, and a folder without the record, send the text as one user message, as before."""
    from typer.testing import CliRunner

    from lorafit.cli import app
    from lorafit.data import PROMPT_FILE, DataConfig, Row, encode
    from lorafit.inference import generate as gen

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    record = {"version": 1, "format": "instruction", "layout": "alpaca", "instruction": "cat dog", "system": None}
    adapter = str(tiny_generator_adapter(tmp_path, {PROMPT_FILE: record}))
    tok = tiny_tokenizer()
    row = Row({"instruction": "cat dog", "input": "hello world", "output": "cat"}, "train.jsonl", 1)
    example = encode([row], "instruction", tok, DataConfig(train="t.jsonl"))[0]
    trained = [t for t, label in zip(example.input_ids, example.labels) if label == -100]  # the masked prompt
    bare = tok(gen.render(tok, "hello world"), add_special_tokens=False)["input_ids"]
    sent = []
    monkeypatch.setattr(gen, "stream", lambda net, tok, prompt, *a, **k: sent.append(prompt) or "cat")
    runner = CliRunner()
    for extra, expected in (([], trained), (["--raw"], bare)):
        sent.clear()
        done = runner.invoke(app, ["generate", "--adapter", adapter, *extra, "hello world"])
        assert done.exit_code == 0, done.output
        assert sent == [expected] and trained != bare
    sent.clear()
    done = runner.invoke(app, ["chat", "--adapter", adapter], input="hello world\ndog\n\n")
    assert done.exit_code == 0, done.output
    assert sent[0] == trained and tok(sent[1], add_special_tokens=False)["input_ids"][:len(trained)] == trained
    (tmp_path / "generator" / PROMPT_FILE).unlink()  # an adapter saved before the record existed
    sent.clear()
    assert runner.invoke(app, ["generate", "--adapter", adapter, "hello world"]).exit_code == 0
    assert sent == [bare]


def test_the_command_silences_the_missing_kernel_warning_of_bitsandbytes():
    """bitsandbytes warns on import that an optional CPU kernel package is missing; lorafit never uses that kernel,
    so the command (its entry point, not the library) turns that one logger down before any command runs."""
    import logging

    from lorafit import cli

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        cli.main(["config", "--markdown"])
        assert logger.level == logging.ERROR
    finally:
        logger.setLevel(level)


def test_combine_writes_an_adapter_that_load_adapter_takes(tmp_path, ids):
    for name, seed, r in (("a", 1, 4), ("b", 2, 2)):
        model = lorafit.inject(tiny_llama(), lorafit.LoraConfig(r=r, targets=["q_proj", "v_proj"]))
        randomize_lora(model, seed)
        lorafit.save_adapter(model, tmp_path / name)
    done = run_cli("combine", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "-0.4,1.3", "--method", "svd",
                   "--out", str(tmp_path / "ab"))
    assert done.returncode == 0 and "2 adapters combined (svd): r=4, 4 modules" in done.stderr, done.stderr
    net = lorafit.load_adapter(tiny_llama(), tmp_path / "ab")
    _, tensors = combine([read_input(tmp_path / n) for n in "ab"], [-0.4, 1.3], CombineSpec("svd"))
    want = lorafit.inject(tiny_llama(), lorafit.LoraConfig(r=4, alpha=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for path, layer in lorafit.lora_layers(want):
            layer.lora["default"].lora_A.copy_(tensors[f"{path}.lora_A.weight"])
            layer.lora["default"].lora_B.copy_(tensors[f"{path}.lora_B.weight"])
        assert (net(ids).logits - want(ids).logits).abs().max().item() <= 1e-6
    for args, message in ((["--weights", "0.7", "0.3"], "error: 0.3: no such adapter folder; weights go in one "
                           "option, comma-separated: --weights 0.7,0.3"),
                          (["--method", "ties"], "error: method ties needs a density")):
        done = run_cli("combine", str(tmp_path / "a"), "--out", str(tmp_path / "x"), *args)
        assert done.returncode == 2 and done.stderr.startswith(message) and len(done.stderr.splitlines()) == 1
