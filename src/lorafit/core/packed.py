"""Frozen weights kept in another form than a dense tensor, and the protocol a LoRA layer wraps them through.

A LoRA layer adds B A x to its base's output and, to merge, folds ΔW into the base's dense weight. For a base whose
`weight` is a tensor both are plain. A weight kept packed (quantized: see lorafit.quant for the formats) is a
`PackedWeight` instead: it computes the base product itself (`linear`) and gives its dense form on request
(`dequantize`). `PackedLinear` is the frozen Linear that holds one. The core names no format.

`packed_linear` keeps only the packed weight for backward and dequantizes again there to compute dL/dx = dL/dy @ W:
the dense weight exists only while one layer computes. The base never gets a gradient; LoRA's A and B train on top.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedWeight(nn.Module):
    """A frozen weight of logical shape (out, in) held packed in buffers; a subclass defines `dequantize`.

    `dtype` is the dtype the dense weight had; `dequantize()` gives that back by default.
    """

    format = "?"  # the packing's name, shown in reports: "nf4", "int8", "gguf-Q4_1", ...

    def __init__(self, shape: torch.Size, dtype: torch.dtype):
        super().__init__()
        self.shape = torch.Size(shape)
        self.dtype = dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in `dtype` (default: the dtype it had before packing)."""
        raise NotImplementedError

    def rows(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dequantize(dtype)[index] for a 1-d index; formats whose blocks follow the rows override it to
        dequantize only the rows asked for (an embedding lookup touches a few hundred rows of a large table)."""
        return self.dequantize(dtype)[index]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T + b, memory-lean in training (see the module doc)."""
        return packed_linear(x, self, bias)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def nbytes(self) -> int:
        """Bytes held in memory by the packed form (every buffer of this module)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.format}, shape={tuple(self.shape)}, {self.nbytes() / self.shape.numel() * 8:.2f} bits/weight"


class _DequantMatmul(torch.autograd.Function):
    """y = x @ dequant(W).T with nothing but the packed W kept for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype
        return x.to(dtype) @ weight.dequantize(dtype).T  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.weight.dequantize(grad.dtype)  # (out, in), again: it was not kept
        return (grad @ w).to(ctx.x_dtype), None, None  # (..., in); the base weight gets no gradient


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a product with `x` runs in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, dequant(W), bias) for a frozen packed W (see the module doc)."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        y = _DequantMatmul.apply(x, weight, dtype)
    return y if bias is None else y + bias.to(y.dtype)


class PackedLinear(nn.Module):
    """Drop-in for a frozen nn.Linear: `weight` is a PackedWeight, `bias` stays as it was (frozen)."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def dense_weight(weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """A base weight as a dense tensor: itself, or a packed weight dequantized."""
    return weight.dequantize() if isinstance(weight, PackedWeight) else weight
