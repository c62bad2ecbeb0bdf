"""lorafit plan --devices: each device's share under DDP and FSDP, checked against the one-device table and against
the accounting redone by hand from the architecture's numbers."""

import json
import math

import pytest

from lorafit.tools import plan as P
from lorafit.tools import plan_report
from tests.conftest import run_cli

METHODS = ("full-fp32", "full-mixed", "lora", "qlora")
STATES = ("weights", "grads", "optimizer")


def test_one_device_adds_nothing_and_prints_as_before():
    one, plain = P.plan("gpt2", devices=1), P.plan("gpt2")
    assert "devices" not in one and one == plain
    assert plan_report.format_plan(one) == plan_report.format_plan(plain)
    assert "Per device" not in plan_report.format_plan(one)


@pytest.mark.parametrize("batch, n, checkpointing", [(10, 4, False), (8, 8, True), (2, 3, False)])
def test_ddp_holds_the_one_device_states_and_its_rows_activations(batch, n, checkpointing):
    res = P.plan("gpt2", targets=["c_attn"], batch_size=batch, seq_len=128, checkpointing=checkpointing, devices=n)
    mine = P.plan("gpt2", targets=["c_attn"], batch_size=math.ceil(batch / n), seq_len=128,
                  checkpointing=checkpointing)
    dev, base, lora = res["devices"], res["params"]["base"], res["params"]["trainable"]
    assert dev["rows_per_device"] == math.ceil(batch / n) and set(dev["memory"]) == set(METHODS)
    sent = {"full-fp32": 4 * base, "full-mixed": 2 * base, "lora": 4 * lora, "qlora": 4 * lora}
    for method in METHODS:
        ddp = dev["memory"][method]["ddp"]
        assert [ddp[k] for k in STATES] == [res["memory"][method][k] for k in STATES]
        assert ddp["activations"] == mine["memory"][method]["activations"]
        assert ddp["working"] == 0 and ddp["total"] == sum(ddp[k] for k in (*STATES, "activations"))
        assert ddp["allreduce_bytes"] == ddp["comm_bytes"] == sent[method]


@pytest.mark.parametrize("n", [2, 3, 8])
def test_fsdp_shards_the_states_and_gathers_two_blocks(n):
    d, r = 768, 8
    res = P.plan("gpt2", targets=["c_attn"], r=r, batch_size=4, devices=n)
    block, block_lora = 12 * d * d + 13 * d, r * (d + 3 * d)  # GPT-2 block; LoRA on c_attn (d -> 3d)
    format_bytes = {"full-fp32": 4 * block, "full-mixed": 2 * block, "lora": 2 * block + 4 * block_lora}
    for method in METHODS:
        fsdp, one = res["devices"]["memory"][method]["fsdp"], res["memory"][method]
        assert n * sum(fsdp[k] for k in STATES) == pytest.approx(sum(one[k] for k in STATES), rel=1e-12)
        assert fsdp["activations"] == res["devices"]["memory"][method]["ddp"]["activations"]
        assert fsdp["working"] > 0
        if method in format_bytes:
            assert fsdp["working"] == 2 * format_bytes[method]
        assert fsdp["allgather_bytes"] == 2 * one["weights"] and fsdp["reduce_scatter_bytes"] == one["grads"]
        assert fsdp["comm_bytes"] == fsdp["allgather_bytes"] + fsdp["reduce_scatter_bytes"]
    nf4_block = 12 * d * d * (4 + 8 / 64 + 32 / (64 * 256)) / 8  # block matrices in NF4, norms and biases in bf16
    qlora = res["devices"]["memory"]["qlora"]["fsdp"]["working"]
    assert qlora == pytest.approx(2 * (nf4_block + 2 * 13 * d + 4 * block_lora), rel=1e-12)


def test_llama_65b_on_8_devices_fits_lora_fsdp_and_not_full_ddp_in_80gb():
    h, ff, layers, vocab, heads, r, s, n, batch = 8192, 22016, 80, 32000, 64, 8, 512, 8, 8
    block = 4 * h * h + 3 * h * ff + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms
    base = 2 * vocab * h + layers * block + h  # untied embedding and head, final norm
    block_lora = 2 * r * (h + h)  # q_proj and v_proj: A (r, h), B (h, r)
    lora = layers * block_lora
    act = layers * (s * 1 * h * 34 + 5 * heads * s * s * 1) + 4 * s * 1 * vocab  # one row per device
    res = P.plan("llama-65b", batch_size=batch, seq_len=s, devices=n)
    assert (res["params"]["base"], res["params"]["trainable"]) == (base, lora)
    lora_fsdp = res["devices"]["memory"]["lora"]["fsdp"]
    expected = {"weights": (2 * base + 4 * lora) / n, "grads": 4 * lora / n, "optimizer": 8 * lora / n,
                "activations": act, "working": 2 * (2 * block + 4 * block_lora)}
    assert {k: lora_fsdp[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    assert lora_fsdp["total"] == pytest.approx(sum(expected.values()), rel=1e-12)
    assert lora_fsdp["total"] < 40e9  # far below an 80 GB device
    assert lora_fsdp["comm_bytes"] == 2 * (2 * base + 4 * lora) + 4 * lora
    full_ddp = res["devices"]["memory"]["full-mixed"]["ddp"]
    assert full_ddp["total"] == 16 * base + act > 80e9 and full_ddp["allreduce_bytes"] == 2 * base


def test_devices_below_one_are_refused():
    with pytest.raises(P.PlanError, match="devices must be >= 1.* and 0"):
        P.plan("gpt2", devices=0)


def test_cli_prints_the_per_device_section_and_keeps_it_in_plan_json(tmp_path):
    done = run_cli("plan", "llama-65b", "--devices", "8", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = lines.index("### Per device on 8 devices (DDP / FSDP)")
    table = [line for line in lines[start:] if line.startswith("| ")][1:]  # rows after the header
    assert [line.split(" | ")[1] for line in table[:8]] == ["DDP", "FSDP"] * 4
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["devices"]["count"] == 8 and set(saved["devices"]["memory"]["qlora"]) == {"ddp", "fsdp"}
    done = run_cli("plan", "gpt2", "--devices", "0", "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and "--devices" in done.stderr and "greater than or equal to 1" in done.stderr
