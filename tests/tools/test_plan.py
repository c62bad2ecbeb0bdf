"""lorafit.plan: counts, file sizes and memory from a config, checked against closed forms, PEFT and real files."""

import json
import math

import pytest
import torch

import lorafit
from lorafit.models import fetch
from lorafit.tools import plan as P
from lorafit.tools import plan_report
from tests.conftest import tiny_gguf, tiny_gpt2, tiny_llama


def gpt2_params(n_layer: int, d: int, vocab: int = 50257, n_pos: int = 1024) -> int:
    """GPT-2 by hand: token + position embeddings, 12d^2 + 13d per block (2 norms, c_attn, c_proj, c_fc, mlp
    c_proj with biases), final norm; the LM head is tied to the token embedding."""
    return vocab * d + n_pos * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def test_gpt2_medium_r8_c_attn_prints_the_talks_line():
    res = P.plan("gpt2-medium", r=8, targets=["c_attn"])
    assert res["params"]["peft_line"] == "trainable params: 786,432 || all params: 355,609,600 || trainable%: 0.2212"
    assert res["params"]["base"] == 354_823_168  # the talk's full-model line
    assert plan_report.format_plan(res).splitlines()[0] == res["params"]["peft_line"]


@pytest.mark.parametrize("name, n_layer, d, n_pos", [("gpt2", 12, 768, 1024), ("gpt2-medium", 24, 1024, 1024),
                                                     ("gpt2-xl", 48, 1600, 1024), ("gpt3-175b", 96, 12288, 2048)])
def test_meta_count_equals_the_gpt2_formula(name, n_layer, d, n_pos):
    config, _ = P.load_config(name)
    model = P.build_meta(config)
    assert sum(p.numel() for p in model.parameters()) == gpt2_params(n_layer, d, n_pos=n_pos)
    assert all(p.is_meta for p in model.parameters())


def test_gpt3_r4_q_v_gives_the_papers_35mb_adapter():
    res = P.plan("gpt3-175b", r=4, targets=["q", "v"], adapter_dtype="fp16")
    d, layers = 12288, 96
    assert res["params"]["trainable"] == layers * 2 * (d * 4 + 4 * d) == 18_874_368
    f = res["adapter_file"]
    assert f["tensor_bytes"] == 37_748_736 and f["tensors"] == layers * 2 * 2
    assert 0 < f["file_bytes"] - f["tensor_bytes"] < 60_000  # the JSON header
    assert round(f["file_bytes"] / 2**20) == 36
    assert 349e9 < res["base_file_fp16_bytes"] < 350e9
    assert res["memory"]["full-mixed"]["total"] > 16 * res["params"]["base"]  # + activations
    assert any("1.2 TB" in note for note in res["notes"])


def _config_dir(model: torch.nn.Module, tmp_path):
    model.config.to_json_file(tmp_path / "config.json")
    return str(tmp_path)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"], ["q_proj", "embed_tokens"]])
def test_counts_equal_peft_on_the_built_model(targets, tmp_path):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    model = tiny_llama()
    folder = _config_dir(model, tmp_path)
    res = P.plan(folder, r=4, targets=targets)
    tm = "all-linear" if targets == ["all-linear"] else targets
    peft_model = get_peft_model(model, PeftConfig(r=4, lora_alpha=8, target_modules=tm))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (res["params"]["trainable"], res["params"]["all"]) == (trainable, total)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32), ("fp16", torch.float16),
                                                ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("build, targets", [(tiny_llama, ["q_proj", "v_proj", "embed_tokens"]),
                                            (tiny_gpt2, ["c_attn", "c_fc"])])
def test_adapter_file_size_equals_the_saved_file(build, targets, dtype, torch_dtype, tmp_path):
    model = build()
    res = P.plan(_config_dir(model, tmp_path), r=4, targets=targets, adapter_dtype=dtype)
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets=targets))
    saved = lorafit.save_adapter(model.to(torch_dtype), tmp_path / "adapter")
    assert res["adapter_file"]["file_bytes"] == saved["file_bytes"]
    assert res["adapter_file"]["tensor_bytes"] == saved["tensor_bytes"]


def test_smollm2_default_targets_are_q_and_v():
    res = P.plan("smollm2-135m", r=8)
    assert res["params"]["base"] == 134_515_008
    assert res["lora"]["targets"] == ["q_proj", "v_proj"]
    h, kv = 576, 3 * 64  # v_proj maps to the 3 key/value heads of 64
    assert res["params"]["trainable"] == 30 * 8 * ((h + h) + (h + kv)) == 460_800


def test_fused_slices_count_d_by_d_updates():
    res = P.plan("gpt2", r=2, targets=["q", "k", "v"])
    assert res["params"]["trainable"] == 12 * 3 * 2 * (768 + 768)
    assert P.plan("gpt2", r=2)["fused_slices"] == ["q", "v"]  # the default: the paper's W_q, W_v


def test_nf4_double_quantization_costs_0127_bits():
    n = 64 * 256 * 1000
    assert P.nf4_bytes(n) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-12)
    assert P.nf4_bytes(1) == 1 + 1 + 4  # a half byte rounds up, one 8-bit absmax, one fp32 second-level scale


def test_memory_table_bytes_per_param():
    res = P.plan("gpt2-medium", r=8, targets=["c_attn"], batch_size=2, seq_len=256)
    base, lora, mem = res["params"]["base"], res["params"]["trainable"], res["memory"]
    for method in ("full-fp32", "full-mixed"):
        assert mem[method]["weights"] + mem[method]["grads"] + mem[method]["optimizer"] == 16 * base
    assert mem["full-fp32"]["activations"] == 2 * mem["full-mixed"]["activations"]
    assert (mem["lora"]["weights"], mem["lora"]["grads"], mem["lora"]["optimizer"]) == (2 * base + 4 * lora,
                                                                                        4 * lora, 8 * lora)
    quant = 24 * 12 * 1024 * 1024  # the block matrices; embeddings, norms and biases stay bf16
    assert res["qlora"]["quantized_params"] == quant
    nf4 = quant / 2 + quant / 64 + quant / (64 * 256) * 4  # every matrix is a multiple of 64 * 256
    assert mem["qlora"]["weights"] == nf4 + 2 * (base - quant) + 4 * lora
    for row in mem.values():
        assert row["total"] == row["weights"] + row["grads"] + row["optimizer"] + row["activations"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_follow_korthikanti(checkpointing):
    s, b, h, a, layers, vocab = 256, 2, 1024, 16, 24, 50257
    res = P.plan("gpt2-medium", targets=["c_attn"], batch_size=b, seq_len=s, checkpointing=checkpointing)
    per_layer = s * b * h * (34 + 5 * a * s / h)
    kept = layers * 2 * s * b * h + per_layer if checkpointing else layers * per_layer
    assert res["memory"]["lora"]["activations"] == pytest.approx(kept + 4 * s * b * vocab, rel=1e-12)


def test_gguf_header_alone_is_enough(tmp_path):
    tiny_gguf(tmp_path / "tiny.gguf")
    res = P.plan(str(tmp_path / "tiny.gguf"), r=4)
    reference = tiny_llama()  # the same shapes; the GGUF has no output.weight, so its head is tied
    untied_head = reference.lm_head.weight.numel()
    assert res["params"]["base"] == sum(p.numel() for p in reference.parameters()) - untied_head
    assert res["params"]["trainable"] == 2 * 4 * ((64 + 64) + (64 + 32))


@pytest.mark.slow
def test_real_gguf_and_model_folder_match_the_presets():
    gguf_file, minilm = fetch("smollm2-135m-instruct"), fetch("minilm-l6")  # from the cache once fetched
    assert P.plan(str(gguf_file), r=8)["params"] == P.plan("smollm2-135m", r=8)["params"]
    assert P.plan(str(minilm), r=8)["params"] == P.plan("minilm-l6", r=8)["params"]


def test_errors_name_the_preset_file_and_modules(tmp_path):
    with pytest.raises(P.PlanError, match="presets: gpt2, gpt2-medium.*llama-65b"):
        P.plan("gpt-5")
    with pytest.raises(P.PlanError, match=f"{tmp_path / 'config.json'}: not found"):
        P.plan(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(P.PlanError, match="config.json: not valid JSON"):
        P.plan(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(P.PlanError, match="config.json: no 'model_type' key"):
        P.plan(str(tmp_path))
    with pytest.raises(P.PlanError, match="match no module.*c_attn, c_fc, c_proj.*q, k, v name the slices"):
        P.plan("gpt2", targets=["q_proj"])
    with pytest.raises(P.PlanError, match="adapter_dtype must be one of fp32, fp16, bf16"):
        P.plan("gpt2", adapter_dtype="int8")


def test_write_report_writes_json_markdown_and_png(tmp_path):
    res = P.plan("smollm2-135m", r=8, targets=["q_proj", "v_proj"], checkpointing=True)
    paths = plan_report.write_report(res, tmp_path / "plan")
    assert json.loads((tmp_path / "plan" / "plan.json").read_text()) == json.loads(json.dumps(res))
    md = (tmp_path / "plan" / "plan.md").read_text()
    assert md.startswith(res["params"]["peft_line"]) and "### Assumptions" in md and "16 bytes/param" in md
    assert (tmp_path / "plan" / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(paths) == {"json", "md", "png"} and math.isfinite(res["params"]["trainable_pct"])
