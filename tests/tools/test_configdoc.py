"""`lorafit config` and docs/config.md list every run-config key, from the config classes themselves."""

import ast

import yaml

from lorafit.tools.configdoc import config_keys, markdown
from lorafit.training.config import load_run_config
from tests.conftest import REPO, run_cli


def test_every_key_has_a_type_a_default_and_a_meaning():
    rows = config_keys()
    assert [row["key"] for row in rows if not row["meaning"]] == []
    keys = {row["key"] for row in rows}
    assert {"lora.r", "lora.targets", "train.compile", "eval.limit", "method.name", "data.train", "out"} <= keys
    compile_row = next(row for row in rows if row["key"] == "train.compile")
    assert "a working C++ compiler" in compile_row["meaning"]  # a meaning continued on the next comment line


def test_every_listed_key_is_one_the_run_config_accepts_with_its_default(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    for row in config_keys():
        if row["default"] == "(required)":
            continue
        value = yaml.safe_dump(ast.literal_eval(row["default"]), default_flow_style=True).removesuffix("...\n")
        load_run_config(None, ["--data.train", str(data), f"--{row['key']}", value.strip()])


def test_the_docs_page_is_what_the_command_prints():
    """docs/config.md is generated (`lorafit config --markdown > docs/config.md`): regenerate it when a key changes."""
    assert (REPO / "docs" / "config.md").read_text() == markdown(config_keys())
    done = run_cli("config")
    assert done.returncode == 0 and "lora.targets" in done.stdout
