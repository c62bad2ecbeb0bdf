"""The `lorafit` command, run as a real subprocess."""

import json
import os
import subprocess
import sys

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
