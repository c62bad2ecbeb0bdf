"""The benchmarks' plumbing on a tiny model: their figures are not checked (speed is not a test), their maths is."""

import json

import pytest
import torch

from lorafit.tools.bench import latency
from lorafit.tools.bench.common import EXAMPLE_DATA, forward_flops
from lorafit.tools.bench.dist import DistBench
from lorafit.tools.bench.dist import format_table as format_dist
from lorafit.tools.bench.dist import run as run_dist
from lorafit.tools.bench.latency import LatencyBench, models
from lorafit.tools.bench.train import SETUPS, TrainBench, format_table, run
from tests.conftest import saved_tiny_model, tiny_gpt2, tiny_llama


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


def _bench_job(tmp_path):
    """(a saved tiny model, a JSONL file of text) for the training benchmarks."""
    net = saved_tiny_model(tmp_path / "model")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"text": "hello world cat dog " * 8}) for _ in range(4)) + "\n")
    return net, data


@pytest.mark.slow
def test_bench_train_runs_every_setup_in_its_own_worker_and_writes_bench_json(tmp_path):
    net, data = _bench_job(tmp_path)
    cfg = TrainBench(model=str(net), data=str(data), batch_size=2, seq_len=8, r=2, warmup=1, steps=2,
                     out=str(tmp_path / "bench"), keep_freed_memory=True)
    result = run(cfg, log=lambda _: None)
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert saved == result and [r["name"] for r in saved["rows"]] == list(SETUPS)
    assert {"cpu", "threads", "torch", "allocator"} <= set(saved["machine"])
    assert "freed memory kept" in saved["machine"]["allocator"]  # every worker ran so, and the report says it
    for row in saved["rows"]:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
    losses = {r["name"]: r["final_loss"] for r in saved["rows"]}
    # Same batches, same starting point: one optimizer step apart at most, every setup sees a similar loss.
    assert max(losses.values()) - min(losses.values()) < 0.5
    assert "| lorafit-fast |" in format_table(saved)
    assert all(row["peak_gpu_mb"] is None for row in saved["rows"]) and "GPU" not in format_table(saved)
    on_gpu = {**saved, "config": {**saved["config"], "device": "cuda"}, "machine": {**saved["machine"], "gpu": "H1"},
              "rows": [{**row, "peak_gpu_mb": 1234} for row in saved["rows"]]}
    table = format_table(on_gpu)  # how a GPU run reports: its peak memory column and the device it ran on
    assert "| peak GPU MB |" in table and "| 1,234 |" in table and "device cuda (H1)" in table


def test_bench_train_refuses_a_device_this_machine_lacks():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        TrainBench(device="cuda")


def test_latency_settings_parse_and_shrink_divides_batch_sizes_only():
    assert latency.parse_settings("lecture") == [(32, 512), (16, 256), (1, 128)]
    assert latency.parse_settings("4x512, 2X256") == [(4, 512), (2, 256)]
    with pytest.raises(ValueError, match="'4by512'"):
        latency.parse_settings("4by512,1x128")
    cfg = LatencyBench(settings=latency.parse_settings("lecture"), shrink=16)
    assert latency.planned(cfg) == [((32, 512), (2, 512)), ((16, 256), (1, 256)), ((1, 128), (1, 128))]
    assert latency.planned(LatencyBench(batch_size=3, seq_len=7)) == [((3, 7), (3, 7))]
    with pytest.raises(ValueError, match="shrink"):
        latency.planned(LatencyBench(shrink=0))


def test_gpt2_medium_random_has_gpt2_mediums_shape_and_parameter_count():
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):  # shapes only: no 1.4 GB of random weights
        net = GPT2LMHeadModel(latency.gpt2_medium_config())
    d, layers, vocab, positions = 1024, 24, 50257, 1024
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)  # 2 LNs, attn, mlp
    expected = vocab * d + positions * d + layers * block + 2 * d  # lm head tied to the embedding
    assert sum(p.numel() for p in net.parameters()) == expected == 354_823_168


def test_latency_models_on_gpt2_share_base_weights_and_only_merging_is_exact(ids):
    nets = models(LatencyBench(bottleneck=4), base=tiny_gpt2())
    fresh = tiny_gpt2()
    with torch.no_grad():
        out = {name: net(input_ids=ids).logits for name, net in nets.items()}
        assert torch.equal(out["base"], fresh(input_ids=ids).logits)  # building the others left the base alone
    r, targets = latency.lora_setup(LatencyBench(), nets["base"])
    assert (r, targets) == (4, ["c_attn"])  # the paper's GPT-2 setting
    torch.testing.assert_close(out["lora-merged"], out["lora-unmerged"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["adapter"], out["base"]) and not torch.allclose(out["lora-merged"], out["base"])
    houlsby = [n for n, _ in nets["adapter"].named_modules() if n.endswith(".houlsby")]
    assert houlsby[:2] == ["transformer.h.0.attn.houlsby", "transformer.h.0.mlp.houlsby"] and len(houlsby) == 4
    weight = nets["base"].transformer.h[0].mlp.c_fc.weight
    assert nets["adapter"].transformer.h[0].mlp.c_fc.weight is weight
    assert nets["lora-unmerged"].transformer.h[0].mlp.c_fc.weight is weight
    assert nets["lora-merged"].transformer.h[0].mlp.c_fc.weight.data_ptr() != weight.data_ptr()


def test_latency_run_times_every_model_at_every_setting_and_quotes_the_lecture(tmp_path):
    net = tmp_path / "model"
    saved_tiny_model(net)
    threads = torch.get_num_threads()
    cfg = LatencyBench(model=str(net), settings=[(2, 8), (1, 4)], shrink=2, bottleneck=4, warmup=1, repeats=2,
                       threads=1, out=str(tmp_path / "bench"))
    result = latency.run(cfg, log=lambda _: None)
    assert torch.get_num_threads() == threads and result["machine"]["threads"] == 1
    saved = json.loads((tmp_path / "bench" / "latency.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [(r["setting"], r["asked"], r["name"]) for r in saved["rows"]] == [
        (s, a, name) for s, a in [("1x8", "2x8"), ("1x4", "1x4")] for name in latency.ROWS]
    for row in saved["rows"]:
        assert 0 < row["ms_min"] <= row["ms"]
        assert row["overhead_pct"] == pytest.approx(100 * (row["vs_base"] - 1), abs=0.1)
    assert saved["merged_vs_unmerged_max_abs_logit"] < 1e-4 < saved["adapter_vs_base_max_abs_logit"]
    assert saved["adapter_params"] == 2 * 2 * (2 * 64 * 4 + 64 + 4)  # layers x targets x (2dm + d + m)
    text = (tmp_path / "bench" / "latency.md").read_text()
    assert "| 1 × 8 (of 2 × 8) | adapter |" in text and "25.8 ± 2.2 (+30.3%)" in text  # the lecture's table
    for row in result["rows"]:
        row["asked"] = "1x128"  # as if run at the lecture's 1 x 128: its figures join the measured rows
    assert "| adapter | " in latency.format_table(result)
    assert [line for line in latency.format_table(result).splitlines() if "| adapter |" in line][0].endswith(
        "| Adapter^H +30.3% (^L +20.7%) |")


def test_latency_run_writes_json_markdown_and_png(tmp_path):
    net = tmp_path / "model"
    saved_tiny_model(net)
    cfg = LatencyBench(model=str(net), settings=[(2, 6), (1, 4)], targets=["q_proj"], warmup=1, repeats=2,
                       out=str(tmp_path / "latency"))
    result = latency.run(cfg, log=lambda _: None)
    out = tmp_path / "latency"
    assert json.loads((out / "latency.json").read_text()) == json.loads(json.dumps(result))
    assert [(r["setting"], r["name"]) for r in result["rows"]] == [(s, n) for s in ("2x6", "1x4") for n in latency.ROWS]
    assert "| 2 × 6 | lora-merged |" in (out / "latency.md").read_text()
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_benchmark_data_is_the_shipped_wordnet_file():
    """`lorafit bench train` without --data reads the repository's example data: the path must survive moves."""
    assert EXAMPLE_DATA.is_file() and EXAMPLE_DATA.name == "category_train.jsonl"


@pytest.mark.slow
def test_bench_dist_runs_one_and_two_processes_and_counts_the_bytes_each_step_reduces(tmp_path):
    net, data = _bench_job(tmp_path)
    cfg = DistBench(model=str(net), data=str(data), batch_size=4, seq_len=8, r=2, warmup=0, steps=2, rounds=1,
                    cores=2, methods=["lora"], out=str(tmp_path / "bench"))
    result = run_dist(cfg, log=lambda _: None)
    assert json.loads((tmp_path / "bench" / "bench.json").read_text()) == result
    one, two = result["rows"]
    assert (one["processes"], one["threads_per_process"], two["processes"], two["threads_per_process"]) == (1, 2, 2, 1)
    for row in (one, two):
        assert row["step_s"] > 0 and len(row["peak_rss_mb_per_process"]) == row["processes"]
    assert one["bytes_per_step"] == 0  # nothing to send
    assert two["bytes_per_step"] == 4 * two["trainable_params"] > 0  # the fp32 LoRA gradients, nothing else
    assert "| lora | 2 x 1 |" in format_dist(result)


def test_bench_dist_refuses_one_process_or_a_batch_smaller_than_the_processes():
    with pytest.raises(ValueError, match="nproc must be >= 2"):
        DistBench(nproc=1)
    with pytest.raises(ValueError, match="batch_size >= nproc"):
        DistBench(nproc=4, batch_size=2)
