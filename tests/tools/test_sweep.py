"""`lorafit sweep`: cells run as real `lorafit train` subprocesses, a finished cell is not re-run, failures are rows."""

import json

import pytest

from lorafit.tools.sweep import BUDGET, cells
from tests.conftest import run_cli, tiny_job


def test_the_budget_grid_spends_the_same_parameters_three_ways():
    per_matrix = {s: len(s) * r for s, r in BUDGET}  # matrices x rank: LoRA params are r * (d_in + d_out) each
    assert set(per_matrix.values()) == {8}
    assert cells("targets", "bert")["lora-qv"] == ["--lora.targets", "[query,value]"]
    with pytest.raises(ValueError, match="unknown grid"):
        cells("depth")


@pytest.mark.slow
def test_sweep_runs_cells_resumes_and_records_a_failing_cell(tmp_path):
    tmp_path, model = tiny_job(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": {"name": str(model)}, "lora": {"targets": ["q_proj", "v_proj"]},
        "data": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.jsonl"),
                 "format": "instruction"},
        "train": {"steps": 2, "batch_size": 4, "precision": "fp32"}, "eval": {"max_new_tokens": 2}}))
    out = tmp_path / "sweep"
    args = ("sweep", str(config), "--grid", "rank", "--grid", "methods", "--grid", "quantize",
            "--only", "r1,r64,bitfit,nf4,nf4-emb-ckpt",
            "--out", str(out), "--train.lr", "1e-2")
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    rows = {r["cell"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert set(rows) == {"r1", "r64", "bitfit", "nf4", "nf4-emb-ckpt"}
    assert 0 < rows["nf4"]["model_bytes"] < rows["r1"]["model_bytes"]  # the blocks' Linears in 4 bits
    assert rows["nf4-emb-ckpt"]["model_bytes"] < rows["nf4"]["model_bytes"]  # and the embedding table
    # q_proj (64 -> 64) and v_proj (64 -> 32: 2 kv heads of 16) in each of 2 layers; r * (d_in + d_out) each
    assert rows["r1"]["trainable_params"] == 2 * (1 * (64 + 64) + 1 * (64 + 32))
    assert rows["r64"]["trainable_params"] == 64 * rows["r1"]["trainable_params"]
    assert "no bias parameters" in rows["bitfit"]["error"]  # Llama has none: a row, not a crash
    assert (out / "sweep.png").is_file() and "| r64 |" in (out / "sweep.md").read_text()
    stamp = (out / "cells" / "r1" / "results.json").stat().st_mtime_ns
    again = run_cli(*args)
    assert again.returncode == 0 and "[r1] done before" in again.stderr
    assert (out / "cells" / "r1" / "results.json").stat().st_mtime_ns == stamp
