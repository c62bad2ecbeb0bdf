"""A frozen Linear whose weight is stored quantized and dequantized on the fly, in forward and in backward.

The point is memory: the dense weight exists only while one layer computes. `dequant_linear` is an autograd
function that saves nothing for backward but a reference to the quantized weight; backward dequantizes again
to compute dL/dx = dL/dy @ W. The base never gets a gradient: only LoRA's A and B train on top.
"""

from __future__ import annotations

import torch
from torch import nn


class QuantWeight(nn.Module):
    """A weight of logical shape (out, in) held in a compressed form (buffers), with `dequantize(dtype)`.

    Subclasses: NF4Weight and Int8Weight (bitsandbytes), GGUFWeight (a GGUF file's blocks as they are).
    `dtype` is the dtype the dense weight had; `dequantize()` gives that back by default.
    """

    format = "?"  # "nf4", "int8", "gguf-Q4_1", ...

    def __init__(self, shape: torch.Size, dtype: torch.dtype):
        super().__init__()
        self.shape = torch.Size(shape)
        self.dtype = dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dequantize(dtype)[index] for a 1-d index; formats whose blocks follow the rows override it to
        dequantize only the rows asked for (an embedding lookup touches a few hundred of 49,152)."""
        return self.dequantize(dtype)[index]

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def nbytes(self) -> int:
        """Bytes held in memory by the compressed form (every buffer of this module)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.format}, shape={tuple(self.shape)}, {self.nbytes() / self.shape.numel() * 8:.2f} bits/weight"


class _DequantMatmul(torch.autograd.Function):
    """y = x @ dequant(W).T with nothing but the quantized W kept for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype
        return x.to(dtype) @ weight.dequantize(dtype).T  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.weight.dequantize(grad.dtype)  # (out, in), again: it was not kept
        return (grad @ w).to(ctx.x_dtype), None, None  # (..., in); the base weight gets no gradient


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the product runs in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dequant_linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, dequant(W), bias) for a frozen quantized W, memory-lean in training (see the module doc)."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        y = _DequantMatmul.apply(x, weight, dtype)
    return y if bias is None else y + bias.to(y.dtype)


class QuantLinear(nn.Module):
    """Drop-in for a frozen nn.Linear: `weight` is a QuantWeight, `bias` stays as it was (frozen)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequant_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
