"""NF4 (QLoRA) and int8 weights through bitsandbytes, which quantizes and dequantizes on CPU and GPU.

NF4 (Dettmers et al. 2023): 4-bit NormalFloat codes, one absmax per block of 64 weights, and double
quantization: those absmax values are themselves quantized to 8 bits in blocks of 256, with one fp32 scale per
block and a shared offset. About 4.127 bits per weight. int8: one absmax per output row, 8 bits per weight
(LLM.int8's vector-wise scheme, without its fp16 outlier columns).

The compressed pieces live in buffers, so `.to(device)` and state dicts see them; bitsandbytes' QuantState is
rebuilt from them on each dequantize (a few Python attribute sets, no copies).
"""

from __future__ import annotations

import logging

import torch

from ..core.packed import PackedWeight

NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256  # 4-bit blocks of 64 weights; their 8-bit absmax values in blocks of 256


def _bnb():
    """bitsandbytes.functional, imported on first use.

    On CPUs with bf16 its import warns that an optional 4-bit GEMM kernel (fetched from a model hub) is missing;
    lorafit never uses that kernel (it dequantizes and multiplies itself), so the warning is silenced.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnb_f  # heavy: imported on first use (see the docstring)

    return bnb_f


class NF4Weight(PackedWeight):
    """A weight in NF4 with double-quantized block scales: bitsandbytes' quantize_4bit / dequantize_4bit."""

    format = "nf4"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape, weight.dtype)
        packed, state = _bnb().quantize_4bit(weight.detach(), blocksize=NF4_BLOCK, compress_statistics=True,
                                             quant_type="nf4")
        self.register_buffer("packed", packed)  # (numel / 2, 1) uint8: two 4-bit codes per byte
        self.register_buffer("absmax", state.absmax)  # (blocks,) uint8: each block's scale, 8-bit quantized
        self.register_buffer("code", state.code)  # (16,) fp32: the NF4 levels
        self.register_buffer("absmax_scale", state.state2.absmax)  # (blocks / 256,) fp32
        self.register_buffer("absmax_code", state.state2.code)  # (256,) fp32: the 8-bit dynamic code of the scales
        self.register_buffer("offset", state.offset.reshape(()))  # mean of the absmax values, taken out before
        assert state.state2.blocksize == NF4_SCALE_BLOCK, state.state2.blocksize

    def _state(self, dtype: torch.dtype):
        bnb_f = _bnb()
        scales = bnb_f.QuantState(absmax=self.absmax_scale, code=self.absmax_code, blocksize=NF4_SCALE_BLOCK,
                                  dtype=torch.float32)
        return bnb_f.QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=NF4_BLOCK,
                                quant_type="nf4", dtype=dtype, offset=self.offset, state2=scales)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        return _bnb().dequantize_4bit(self.packed, self._state(dtype)).to(dtype)  # (out, in)

    def rows(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Only the rows `index`, when each row is whole blocks of 64 (the scales are dequantized for all)."""
        out, cols = self.shape
        if cols % NF4_BLOCK:
            return super().rows(index, dtype)
        dtype, bnb_f = dtype or self.dtype, _bnb()
        state = self._state(dtype)
        absmax = bnb_f.dequantize_blockwise(self.absmax, state.state2) + self.offset  # (blocks,) fp32
        packed = self.packed.view(out, cols // 2)[index].reshape(-1, 1)  # the rows' bytes, in order
        row_state = bnb_f.QuantState(absmax=absmax.view(out, -1)[index].reshape(-1), shape=(len(index), cols),
                                     code=self.code, blocksize=NF4_BLOCK, quant_type="nf4", dtype=dtype)
        return bnb_f.dequantize_4bit(packed, row_state).to(dtype)  # (len(index), in)


class Int8Weight(PackedWeight):
    """A weight in int8 with one absmax per output row: bitsandbytes' int8_vectorwise_quant / _dequant."""

    format = "int8"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape, weight.dtype)
        q, row_absmax, _ = _bnb().int8_vectorwise_quant(weight.detach().to(torch.float16))
        self.register_buffer("q", q)  # (out, in) int8
        self.register_buffer("row_absmax", row_absmax)  # (out,) fp32

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _bnb().int8_vectorwise_dequant(self.q, self.row_absmax).to(dtype or self.dtype)  # (out, in)

    def rows(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _bnb().int8_vectorwise_dequant(self.q[index], self.row_absmax[index]).to(dtype or self.dtype)
