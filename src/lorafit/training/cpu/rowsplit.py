"""Frozen bf16 linear products computed in two halves of rows where that runs faster on this CPU.

Why: PyTorch's bf16 matrix products on a CPU go to oneDNN, whose choice of how to share a product between threads
depends on its shape. On a 2-core CPU some shapes (a few hundred output columns, about a thousand rows) ran on one
core, and two products of half the rows each ran clearly faster; other shapes lose from halving
(docs/performance.md has the figures). So nothing is hard-coded: `apply` times every frozen Linear's forward
product (x @ W.T) and input-gradient product (grad @ W) at the run's row count, whole and in halves, and halves
only those where it is clearly faster. Each row is the same dot products either way.

`apply` changes no parameter and no state-dict key: a plain nn.Linear becomes a `RowSplitLinear` (an nn.Linear
whose forward routes through `linear`), a LoRA layer gets the choice as its `base_product`.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from ...core.lora import LoraLinear

MARGIN = 0.9  # halves must take under 90% of the whole product's time, so timing noise seldom picks them
_REPEATS = 5  # timings per variant; the fastest counts


def product(a: torch.Tensor, b: torch.Tensor, halves: bool) -> torch.Tensor:
    """a (M, K) @ b (K, N), as one product or as two of M/2 rows each."""
    if not halves or a.shape[0] < 2:
        return a @ b
    h = a.shape[0] // 2
    out = a.new_empty(a.shape[0], b.shape[1])  # (M, N); each half written in place: no copy to join them
    # The first half as an explicit strided view: in compiled blocks (dynamic shapes) inductor copied `a[:h]` of
    # a reshaped 3-d activation into a buffer of its own before the product; this view it passes as it is.
    torch.mm(a.as_strided((h, a.shape[1]), a.stride()), b, out=out[:h])
    torch.mm(a[h:], b, out=out[h:])
    return out


class _FrozenProduct(torch.autograd.Function):
    """x @ W.T for a frozen W: the gradient goes to x only, through its own choice of halves."""

    @staticmethod
    def forward(ctx, x, weight, halves_forward: bool, halves_backward: bool):
        ctx.save_for_backward(weight)
        ctx.halves_backward = halves_backward
        return product(x, weight.T, halves_forward)  # (M, out)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return product(grad, weight, ctx.halves_backward), None, None, None  # (M, in)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, split: tuple[bool, bool]) -> torch.Tensor:
    """F.linear(x, weight, bias) for a frozen weight; split = (halve the forward product, halve its backward)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("rowsplit.linear: the weight and bias must be frozen (their gradients are not computed)")
    rows = x.reshape(-1, x.shape[-1]).to(weight.dtype)  # (M, in); autocast would cast it the same way
    y = _FrozenProduct.apply(rows, weight, *split).view(*x.shape[:-1], weight.shape[0])  # (..., out)
    return y if bias is None else y + bias.to(y.dtype)


class RowSplitLinear(nn.Linear):
    """An nn.Linear (same parameters, same state-dict keys) whose frozen product follows `row_split`."""

    row_split: tuple[bool, bool] = (False, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.row_split)


def halves_pay(rows: int, b: torch.Tensor) -> bool:
    """True when (rows x K) @ b (K x N) runs clearly faster as two products of rows/2 (b as the product reads it)."""
    a = torch.randn(rows, b.shape[0], dtype=b.dtype)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(_REPEATS + 1):  # the first round warms both up
        for halves in best:
            start = time.perf_counter()
            product(a, b, halves)
            best[halves] = min(best[halves], time.perf_counter() - start)
    return best[True] < MARGIN * best[False]


def _frozen_bf16(module: nn.Module) -> bool:
    weight, bias = module.weight, module.bias
    return (isinstance(weight, nn.Parameter) and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and not weight.requires_grad and (bias is None or not bias.requires_grad))


@torch.no_grad()
def apply(model: nn.Module, rows: int, skip: nn.Module | None = None) -> dict[tuple[int, int], tuple[bool, bool]]:
    """Time each frozen bf16 Linear shape of `model` at `rows` rows; route the ones where halves pay.

    Returns {(out, in): (halve forward, halve backward)} for every shape timed. `skip` (the output layer, whose
    product the chunked loss makes itself) is left alone.
    """
    choices: dict[tuple[int, int], tuple[bool, bool]] = {}
    for module in model.modules():
        plain = type(module) in (nn.Linear, RowSplitLinear)
        lora = isinstance(module, LoraLinear) and not module.fan_in_fan_out
        if module is skip or not (plain or lora) or not _frozen_bf16(module):
            continue
        shape = tuple(module.weight.shape)  # (out, in)
        if shape not in choices:
            choices[shape] = (halves_pay(rows, module.weight.T), halves_pay(rows, module.weight))
        if plain and any(choices[shape]):
            module.__class__ = RowSplitLinear  # an nn.Linear still: same parameters, same keys
        if isinstance(module, RowSplitLinear):
            module.row_split = choices[shape]
        elif lora and any(choices[shape]):
            module.base_product = functools.partial(linear, split=choices[shape])
    return choices


def describe(choices: dict[tuple[int, int], tuple[bool, bool]]) -> str:
    """'576x576 forward and backward, 1536x576 backward' (out x in of the halved products), or 'none'."""
    parts = [f"{out_f}x{in_f} {'forward and backward' if fwd and bwd else 'forward' if fwd else 'backward'}"
             for (out_f, in_f), (fwd, bwd) in choices.items() if fwd or bwd]
    return ", ".join(parts) or "none"
