"""GGUF blocks (lorafit.quant.gguf): every block type against the gguf package, and the real GGUF preset's blocks
kept exactly as transformers dequantizes them."""

import numpy as np
import pytest
import torch

from lorafit.quant import model_bytes, quantize_model, quantized_weights
from lorafit.quant.gguf import BLOCK_BYTES, GGUFError, GGUFWeight, dequantize_blocks, rotary_rows, split_blocks
from tests.conftest import USER_CACHE, answer

gguf_quants = pytest.importorskip("gguf.quants")


@pytest.mark.parametrize("chunk_rows", [4096, 4])  # 4: six rows go as chunks of 4 and 2
@pytest.mark.parametrize("qtype", sorted(BLOCK_BYTES))
def test_gguf_blocks_dequantize_exactly_as_the_gguf_package(qtype, chunk_rows, monkeypatch):
    monkeypatch.setattr("lorafit.quant.gguf.CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 128)).astype(np.float32)
    raw = gguf_quants.quantize(w, gguf_quants.GGMLQuantizationType[qtype])  # (6, 4 blocks * bytes)
    ours = dequantize_blocks(split_blocks(torch.from_numpy(raw), qtype), qtype, torch.float32)
    np.testing.assert_array_equal(ours.numpy(), gguf_quants.dequantize(raw, gguf_quants.GGMLQuantizationType[qtype]))


@pytest.mark.parametrize("qtype", sorted(BLOCK_BYTES))
def test_gguf_kernels_agree_on_arbitrary_block_bytes(qtype):
    """Not only on blocks the quantizer made: any scales and codes a file may hold."""
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(5, 3 * BLOCK_BYTES[qtype]), dtype=np.uint8)
    scales = raw.reshape(5, 3, -1)
    scales[..., 0:4] = rng.standard_normal((5, 3, 2)).astype(np.float16).view(np.uint8)  # finite d (and m)
    ours = dequantize_blocks(split_blocks(torch.from_numpy(raw), qtype), qtype, torch.float32)
    np.testing.assert_array_equal(ours.numpy(), gguf_quants.dequantize(raw, gguf_quants.GGMLQuantizationType[qtype]))


def test_gguf_weight_refuses_block_types_it_has_no_kernel_for():
    with pytest.raises(GGUFError, match="Q6_K is not supported"):
        GGUFWeight(torch.zeros(4, 210, dtype=torch.uint8), "Q6_K", torch.Size([4, 256]), torch.float32)


def test_rotary_rows_is_transformers_reverse_permutation():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = np.arange(48)[:, None]
    expected = LlamaTensorProcessor(config={})._reverse_permute_weights(rows, 4)[:, 0]
    assert rotary_rows(48, 4).tolist() == expected.tolist()


# --- the real GGUF preset ---

@pytest.mark.slow
def test_real_gguf_preset_keeps_its_blocks_exactly_as_transformers_dequantizes_them(monkeypatch):
    from lorafit.models import cached_path, load_model

    monkeypatch.setenv("LORAFIT_CACHE", str(USER_CACHE))
    dense, _ = load_model("smollm2-135m-instruct")
    kept, tok = load_model("smollm2-135m-instruct", quantize="gguf")
    weights = quantized_weights(kept)
    assert len(weights) == 30 * 7 and {w.format for _, w in weights} == {"gguf-Q4_1"}
    for name, weight in weights:
        assert torch.equal(weight.dequantize(), dense.get_parameter(name)), name
    assert model_bytes(kept) < 0.35 * model_bytes(dense)  # 30 Q4_1 blocks beside the fp32 embedding (113 MB)
    assert "Paris" in answer(kept, tok, "What is the capital of France?")
    dense_bytes = model_bytes(dense)
    done = quantize_model(dense, "gguf", cached_path("smollm2-135m-instruct"))  # what it reports: each format
    assert len(done) == 30 * 7 and set(done.values()) == {"gguf-Q4_1"}
    del dense
    all_kept, tok = load_model("smollm2-135m-instruct", quantize="gguf", quantize_embeddings=True)
    table = all_kept.model.embed_tokens.weight
    assert table.format == "gguf-Q8_0" and all_kept.lm_head.weight is table  # the tied head shares the blocks
    assert torch.equal(table.dequantize(), kept.model.embed_tokens.weight)  # transformers' dequantized table
    assert model_bytes(all_kept) < 0.2 * dense_bytes
    assert "Paris" in answer(all_kept, tok, "What is the capital of France?")
