"""Run configs: YAML + overrides, validated once with messages that name the file and the key."""

from pathlib import Path

import pytest

from lorafit import ConfigError
from lorafit.training.config import RunConfig, load_run_config, parse_overrides
from tests.conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    return path


def test_overrides_parse_as_yaml_values():
    assert parse_overrides(["--lora.r", "16", "--train.lr=2e-4", "--lora.targets", "[q_proj, v_proj]"]) == {
        "lora": {"r": 16, "targets": ["q_proj", "v_proj"]}, "train": {"lr": "2e-4"}}


def test_file_plus_overrides_and_relative_data_path(tmp_path):
    path = write(tmp_path, "data:\n  train: train.jsonl\nlora:\n  r: 4\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_run_config(path, ["--lora.r", "16", "--train.lr", "2e-4", "--out", "elsewhere"])
    assert cfg.lora.r == 16 and cfg.train.lr == pytest.approx(2e-4) and cfg.out == "elsewhere"
    assert cfg.data.train == str(tmp_path / "train.jsonl")  # relative to the config file


def test_compile_takes_true_false_or_auto(tmp_path):
    path = write(tmp_path, "data:\n  train: train.jsonl\n")
    assert load_run_config(path).train.compile == "auto"  # the default
    for value, expected in (("true", True), ("false", False), ("auto", "auto")):
        assert load_run_config(path, ["--train.compile", value]).train.compile == expected


@pytest.mark.parametrize("text, overrides, match", [
    ("data:\n  train: t.jsonl\nlora:\n  rank: 4\n", [], r"run.yaml: lora.rank: unknown key; did you mean lora.r\?"),
    ("data:\n  train: t.jsonl\n", ["--train.lr", "fast"], r"^--train.lr: Input should be a valid number"),
    ("data:\n  train: t.jsonl\n", ["--lora.r", "0"], r"^--lora.r: must be a positive integer"),
    ("data:\n  train: t.jsonl\n", ["--lora.rank", "8"], r"^--lora.rank: unknown key; did you mean --lora.r\?$"),
    ("data:\n  train: t.jsonl\n", ["--trian.lr", "1"], r"^--trian.lr: unknown section; did you mean --train.lr\?$"),
    ("data:\n  train: t.jsonl\ntrian:\n  lr: 1\n", [], r"run.yaml: trian: unknown section; did you mean train\?"),
    ("model:\n  name: x\n", [], r"run.yaml: data.train: required key is missing"),
    ("data:\n  train: t.jsonl\n", ["--train.steps"], r"--train.steps has no value"),
    ("data:\n  train: t.jsonl\n", ["--train.device", "tpu"], r"^--train.device: must be auto, cpu, cuda or cuda:N"),
    ("data:\n  train: t.jsonl\n", ["--train.compile", "sometimes"], r"^--train.compile: must be true, false or auto"),
    ("data:\n  train: t.jsonl\n", ["--out.dir", "x"], r"^--out.dir: takes a value, not keys under it \(--out VALUE\)"),
    ("data:\n  train: t.jsonl\n", ["--eval.limit", "0"], r"^--eval.limit: must be >= 1, or null"),
    ("data:\n  train: t.jsonl\n", ["--lora.targets", "q_proj("], r"^--lora.targets: 'q_proj\(' is not a valid regular"),
    ("data:\n  train: t.jsonl\n", ["--lora.targets", "[q"], r"^--lora.targets: value '\[q' is not valid YAML"),
    ("data:\n  train: t.jsonl\nlora:\n  targets: q(\n", [], r"run.yaml: lora.targets: 'q\(' is not a valid regular"),
    ("data: [1, 2\n", [], r"run.yaml: not valid YAML at line 2, column 1: expected ',' or ']'"),
    ("data:\n  train: t.jsonl\nmodel:\n  task: regression\n", [], r"run.yaml: model.task: must be"),
    ("data:\n  train: t.jsonl\n", ["--lora.init", "pissa_fast"], r"^--lora.init: must be one of .*pissa_niter_N"),
    ("data:\n  train: t.jsonl\n", ["--lora.init", "olora", "--model.quantize", "nf4"],
     r"lora.init: olora rewrites .* quantize: none"),
    ("data:\n  train: t.jsonl\n", ["--train.loraplus_lr_ratio", "0"], r"^--train.loraplus_lr_ratio: must be > 0"),
    ("data:\n  train: t.jsonl\n", ["--train.loraplus_lr_ratio", "16", "--method", "mezo"],
     r"loraplus_lr_ratio: .* method mezo has an optimizer of its own"),
    ("data:\n  train: t.jsonl\n", ["--train.loraplus_lr_ratio", "16", "--method", "full"],
     r"loraplus_lr_ratio: .* method full trains no LoRA adapter"),
])
def test_bad_configs_name_file_and_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(write(tmp_path, text), overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")


def test_shipped_example_configs_validate():
    paths = sorted((REPO / "examples").glob("*.yaml"))
    assert {"minilm-wordnet.yaml", "smollm2-reverse.yaml", "smollm2-wordnet.yaml"} <= {p.name for p in paths}
    for path in paths:
        cfg = load_run_config(path)
        assert isinstance(cfg, RunConfig) and Path(cfg.data.train).is_file(), path
