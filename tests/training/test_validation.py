"""One validation row set per run: the loop's periodic loss and the final table score the same rows."""

import json

from lorafit.training.recipe import train
from tests.conftest import tiny_job, tiny_run_config


def test_periodic_validation_uses_the_rows_the_final_table_scores(tmp_path):
    job, model = tiny_job(tmp_path)
    cfg = tiny_run_config(job, model, tmp_path / "run", "--eval.limit", "3", "--eval.metric", "loss")
    report = train(cfg, log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "eval_loss" in row][-1]
    assert report["val_rows"] == 3 and last["eval_rows"] == 3
    assert last["eval_loss"] == round(report["tuned"]["loss"], 7)  # the same rows and final weights
