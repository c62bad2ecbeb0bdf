"""`lorafit bench serve`'s arithmetic and report: percentiles, per-round summaries, the goals as ratios, the
reading of a server-sent event stream. (The load itself runs against real servers in the benchmark.)"""

import json
import math

from lorafit.tools.bench.load import Result, _read_events
from lorafit.tools.bench.serve import format_table, goals
from lorafit.tools.bench.serve_report import percentile, plot, summarize


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0 and math.isnan(percentile([], 50))


def test_summarize_counts_tokens_over_the_wall_time_and_failures():
    results = [Result(ok=True, tokens=10, ttft=0.1, gaps=[0.01, 0.03]), Result(ok=True, tokens=30, ttft=0.3),
               Result(ok=False, error="HTTP 500")]
    s = summarize(results, wall=2.0)
    assert s["tokens_s"] == 20.0 and s["failed"] == 1 and s["errors"] == ["HTTP 500"]
    assert s["ttft_p50_ms"] == 100.0 and s["ttft_p99_ms"] == 300.0 and s["itl_p99_ms"] == 30.0


class Lines:
    """What http.client's response yields: the body's lines as bytes."""

    def __init__(self, lines):
        self.lines = lines

    def __iter__(self):
        return iter(self.lines)


def test_events_give_pieces_and_the_usage_count():
    chunk = {"choices": [{"delta": {"content": "hi"}}]}
    body = [b": keep-alive\n", f"data: {json.dumps(chunk)}\n".encode(), b"\n", f"data: {json.dumps(chunk)}\n".encode(),
            b'data: {"choices": [], "usage": {"completion_tokens": 5}}\n', b"data: [DONE]\n"]
    result = _read_events(Lines(body), started=0.0)
    assert result.ok and result.tokens == 5 and len(result.gaps) == 1
    no_usage = _read_events(Lines(body[:4] + body[5:]), started=0.0)
    assert no_usage.tokens == 2  # counted from the pieces
    assert not _read_events(Lines([b"data: [DONE]\n"]), started=0.0).ok


def fake_result():
    rows = []
    for clients, scale in ((1, 1.0), (8, 4.0)):
        for row, tps in (("lorafit, 8 adapters mixed", 9.0), ("lorafit, one adapter", 10.0), ("lorafit, base", 10.0),
                         ("lorafit, merged", 9.6), ("PEFT generate, mixed", 3.0)):
            rows.append({"row": row, "clients": clients, "tokens_s": tps * scale, "ttft_p50_ms": 10, "ttft_p99_ms": 20,
                         "itl_p50_ms": 5, "itl_p99_ms": 9, "failed": 0})
    config = {"model": "tiny", "adapters": 8, "r": 8, "targets": ["q_proj"], "requests": 8, "max_tokens": 4,
              "rounds": 1, "threads": 2, "clients": [1, 8]}
    return {"machine": {"cpu": "a CPU"}, "config": config, "skipped": {"llama.cpp, base GGUF": "not installed"},
            "limit": {"weight_bytes": 2e8, "bandwidth_gbs": 20.0, "min_step_ms": 10.0,
                      "max_single_stream_tokens_s": 100.0}, "rows": rows}


def test_goals_are_ratios_of_the_rows(tmp_path):
    result = fake_result()
    result["goals"] = g = goals(result)
    assert g["mixed / one adapter @ 8"] == 0.9 and g["mixed / PEFT @ 1"] == 3.0 and g["merged / base @ 1"] == 0.96
    text = format_table(result)
    assert "| 8 | lorafit, one adapter | 40.0 |" in text
    assert "llama.cpp, base GGUF: not measured (not installed)" in text
    plot(result, tmp_path / "serve.png")
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
