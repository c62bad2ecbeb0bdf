"""bitsandbytes' formats (lorafit.quant.bnb): NF4 and int8 weights dequantize exactly as bitsandbytes does."""

import pytest
import torch

from lorafit.quant.bnb import Int8Weight, NF4Weight
from tests.conftest import gaussian

bnb_f = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_matches_bitsandbytes_exactly_with_double_quantized_scales(dtype):
    w = gaussian((96, 128), dtype=dtype)
    nf4 = NF4Weight(w)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(nf4.dequantize(), bnb_f.dequantize_4bit(packed, state))
    assert nf4.absmax.dtype == torch.uint8 and nf4.absmax.numel() == w.numel() // 64  # 8-bit block scales
    assert nf4.packed.numel() == w.numel() // 2  # two 4-bit codes per byte
    error = (nf4.dequantize(torch.float32) - w.float()).norm() / w.float().norm()
    assert 0.05 < error < 0.12  # NF4's rounding on a Gaussian weight: real, and bounded


def test_int8_matches_bitsandbytes_and_keeps_one_scale_per_row():
    w = gaussian((64, 96))
    q, stats, _ = bnb_f.int8_vectorwise_quant(w.half())
    int8 = Int8Weight(w)
    assert torch.equal(int8.dequantize(torch.float32), bnb_f.int8_vectorwise_dequant(q, stats))
    assert int8.row_absmax.shape == (64,)
    assert (int8.dequantize() - w).abs().max() <= w.abs().amax(dim=1).max() / 127
