"""The benchmarks' plumbing on a tiny model: their figures are not checked (speed is not a test), their maths is."""

import json

import torch
from conftest import tiny_llama
from test_models import saved_tiny_model

from lorafit.bench.common import forward_flops
from lorafit.bench.latency import LatencyBench, models
from lorafit.bench.train import SETUPS, TrainBench, format_table, run


def test_forward_flops_counts_every_matmul_of_a_llama():
    cfg = tiny_llama().config  # hidden 64, 4 heads of 16, 2 kv heads, mlp 96, 2 layers, vocab 128
    tokens, seq = 24, 12
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 96  # q, k, v, o, gate/up/down
    linear = 2 * tokens * (2 * per_layer + 128 * 64)
    attention = 2 * (2 * 2 * tokens * seq * 64)  # two layers x (QK^T + AV), each 2 x tokens x seq x hidden
    assert forward_flops(cfg, tokens, seq) == linear + attention


def test_latency_models_merged_equals_unmerged_and_differs_from_base(tmp_path):
    net = tmp_path / "model"
    saved_tiny_model(net)
    nets = models(LatencyBench(model=str(net), targets=["q_proj", "v_proj"]))
    ids = torch.randint(0, 7, (1, 6))
    with torch.no_grad():
        logits = {name: m(input_ids=ids).logits for name, m in nets.items()}
    torch.testing.assert_close(logits["lora-merged"], logits["lora-unmerged"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["base"], logits["lora-unmerged"])  # the adapter is not a no-op
    assert not any("lora" in name for name, _ in nets["lora-merged"].named_parameters())  # plain layers


def test_bench_train_runs_every_setup_in_its_own_worker_and_writes_bench_json(tmp_path):
    net = tmp_path / "model"
    saved_tiny_model(net)
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"text": "hello world cat dog " * 8}) for _ in range(4)) + "\n")
    cfg = TrainBench(model=str(net), data=str(data), batch_size=2, seq_len=8, r=2, warmup=1, steps=2,
                     out=str(tmp_path / "bench"))
    result = run(cfg, log=lambda _: None)
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert saved == result and [r["name"] for r in saved["rows"]] == list(SETUPS)
    assert {"cpu", "threads", "torch", "allocator"} <= set(saved["machine"])
    for row in saved["rows"]:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
    losses = {r["name"]: r["final_loss"] for r in saved["rows"]}
    # Same batches, same starting point: one optimizer step apart at most, every setup sees a similar loss.
    assert max(losses.values()) - min(losses.values()) < 0.5
    assert "| lorafit-fast |" in format_table(saved)
