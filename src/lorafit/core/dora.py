"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

DoRA splits the adapted weight into a direction and a magnitude and trains both:

    W' = m * (W0 + s B A) / ||W0 + s B A||        norms per output row; m (out,) trains, initialised to ||W0||

so at the start (B = 0) W' = W0 exactly. As in the paper (section 4.3) and in PEFT, the norm is treated as a
constant in the backward pass: gradients reach m, A and B, not through the norm. The layer never builds W': with
f = m / ||W0 + s B A|| (out,), its output is

    y' = f * (W0 x + s B A x) + b = y + (f - 1) * (y - b) + f * s B A x          y = W0 x + b, the base output

one extra elementwise pass over the base output. With dropout in training, PEFT applies the (f - 1) term to the
dropped-out input: the base product then runs a second time on it, and so does this file, to train the same model.

The row norms need W0: a dense weight is read as it is; a packed (quantized) one is never made dense per step
(QDoRA): ||W0 + s B A||² = ||W0||² + 2 s <W0, B A> + s² ||B A||² per row, where ||W0||² is computed once and
<W0, B A>_o = sum_k B[o, k] (A W0^T)[k, o] costs one base product on A's r rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoraLinear, LowRank
from .packed import PackedWeight
from .variants import register


class WeightDecomposed(LowRank):
    """A DoRA update: LoRA's A and B plus a trained magnitude per output row, `lora_magnitude_vector` (out,)."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float, init: str):
        super().__init__(in_features, out_features, r, scale, dropout, init)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features))
        self._merged_norm: torch.Tensor | None = None  # ||W0 + ΔW|| per row while merged: unmerge divides by it
        # ||W0||² per row of a packed base, computed once in `bind` (a packed weight never changes); not saved
        self.register_buffer("base_sq", None, persistent=False)

    def bind(self, layer: LoraLinear) -> None:
        """m starts as the row norms of the weight the layer adds to: W' = W0 at first (PEFT does the same)."""
        with torch.no_grad():
            w = _dense(layer).to(self.lora_A.dtype)  # (out, in)
            self.lora_magnitude_vector.copy_(torch.linalg.norm(w + self.delta_weight(), dim=1))
            if isinstance(layer.weight, PackedWeight):
                self.base_sq = w.square().sum(dim=1)  # (out,)

    def row_norm(self, layer: LoraLinear) -> torch.Tensor:
        """||W0 + s B A|| per output row (out,), without gradient."""
        with torch.no_grad():
            if not isinstance(layer.weight, PackedWeight):
                w = _dense(layer).to(self.lora_A.dtype)  # (out, in)
                return torch.linalg.norm(w + self.delta_weight(), dim=1)
            a, b, s = self.lora_A, self.lora_B, self.scale
            aw = layer.weight.linear(a, None).to(a.dtype)  # (r, out) = A W0^T, one product on r rows
            cross = (b * aw.T).sum(dim=1)  # (out,) <W0_o, (B A)_o>
            ba_sq = ((b @ (a @ a.T)) * b).sum(dim=1)  # (out,) ||(B A)_o||²
            if self.base_sq is None:  # the base was packed after this update was bound to it
                self.base_sq = layer.weight.dequantize(a.dtype).square().sum(dim=1)
            return (self.base_sq + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt()

    def add_to(self, y: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """y' = y + (f - 1) * (W0 x) + f * s B A x, with f = m / ||W0 + s B A|| (see the module doc)."""
        f = self.lora_magnitude_vector / self.row_norm(layer)  # (out,)
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        xd = self.dropout(x) if dropped else x
        if not torch.is_autocast_enabled(x.device.type):
            xd = xd.to(self.lora_A.dtype)
        lora = (xd @ self.lora_A.T) @ self.lora_B.T * self.scale  # (..., out)
        if dropped:  # PEFT's (f - 1) term sees the dropped-out input: the base product runs again on it
            base = layer.base_forward(xd.to(x.dtype))
        else:
            base = y
        if layer.bias is not None:
            base = base - layer.bias
        return y + ((f - 1) * base + f * lora).to(y.dtype)

    def fold(self, weight: torch.Tensor, delta: torch.Tensor, sign: float = 1.0,
             transposed: bool = False) -> torch.Tensor:
        """W' = m * (W0 + ΔW) / ||W0 + ΔW|| (sign 1), or back to W0 = W' * ||W0 + ΔW|| / m - ΔW (sign -1).

        The norms of the merge are kept for the unmerge: W' alone does not tell them (its rows have norm m).
        """
        work = torch.promote_types(weight.dtype, torch.float32)
        w, d = weight.to(work), delta.to(work)
        if transposed:  # (in, out) as stored: work on (out, in)
            w, d = w.T, d.T
        m = self.lora_magnitude_vector.to(work)
        if sign > 0:
            self._merged_norm = torch.linalg.norm(w + d, dim=1)  # (out,)
            out = (m / self._merged_norm)[:, None] * (w + d)
        else:
            if self._merged_norm is None:
                raise RuntimeError("this DoRA update was not merged by this process: there is nothing to unmerge")
            out = w * (self._merged_norm / m)[:, None] - d
            self._merged_norm = None
        return (out.T if transposed else out).to(weight.dtype)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(), ".lora_magnitude_vector": self.lora_magnitude_vector}


def _dense(layer: LoraLinear) -> torch.Tensor:
    """The layer's base weight as a dense (out, in) tensor."""
    w = layer.weight.dequantize() if isinstance(layer.weight, PackedWeight) else layer.weight
    return w.T if layer.fan_in_fan_out else w


register("dora", WeightDecomposed)
