"""metrics.jsonl: a new run starts it afresh; a resumed run keeps exactly one row per step up to its checkpoint."""

import json

from lorafit.training.report import MetricsLog, read_metrics


def _rows(path, steps):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps))


def test_a_resumed_log_drops_rows_past_the_checkpoint_repeats_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _rows(path, [1, 2, 3, 4, 2, 3, 4, 5])  # a resume of before that never truncated: 2-4 twice
    with path.open("a") as file:
        file.write('{"step": 6, "lo')  # the process was killed mid-line
    with MetricsLog(path, start_step=3) as metrics:
        metrics.write({"step": 4, "loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert read_metrics(path)[-1] == {"step": 4, "loss": 0.5}


def test_a_new_log_starts_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _rows(path, [1, 2, 3])
    with MetricsLog(path) as metrics:
        metrics.write({"step": 1, "loss": 2.0})
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
