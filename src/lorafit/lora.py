"""The LoRA maths: a frozen weight W0 plus a trainable low-rank update ΔW = B @ A * scale.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1:
h = W0 x + ΔW x = W0 x + B A x, with A (r, in) random and B (out, r) zero at start, so training starts exactly
at the base model. Everything else in lorafit (surgery, merging, files) is bookkeeping around this file.

A LoRA layer keeps the base module's `weight` and `bias` under their own names (the base state dict loads
unchanged) and holds its named low-rank updates in `self.lora[name]`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import rowsplit
from .quant.linear import QuantLinear, QuantWeight, dequant_linear


class LowRank(nn.Module):
    """One low-rank update ΔW = B @ A * scale, in PEFT's layout: lora_A (r, in), lora_B (out, r)."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float, init: str):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:  # the default of nn.Linear (and of PEFT): kaiming-uniform with a = sqrt(5)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B A x * scale for x (..., in), in the adapter's dtype (a bf16 base keeps fp32 LoRA maths).

        Under autocast x is left as it comes: autocast picks the product's dtype, and an fp32 copy of x would
        only cost memory (it is kept for the backward pass) and time.
        """
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        h = self.dropout(x) @ self.lora_A.T  # (..., r)
        return (h @ self.lora_B.T) * self.scale  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B @ A * scale, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale


class LowRankEmbedding(nn.Module):
    """ΔW for an embedding table, in PEFT's layout: lora_embedding_A (r, vocab) zero, lora_embedding_B (dim, r) random.

    The roles flip relative to Linear (A starts at zero, B random) because A is indexed by token id: a zero A
    keeps the update zero at start while the random B lets gradients flow to the looked-up rows of A.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, scale: float, init: str):
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r))
        self.scale = scale
        nn.init.normal_(self.lora_embedding_B)  # as PEFT does, whatever `init` says for Linear layers

    def forward(self, ids: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        """Rows of A.T picked by token id, projected by B: (..., dim). Padding/max-norm options follow the base."""
        h = F.embedding(ids, self.lora_embedding_A.T, embedding.padding_idx, embedding.max_norm,
                        embedding.norm_type, embedding.scale_grad_by_freq, embedding.sparse)  # (..., r)
        return (h @ self.lora_embedding_B.T) * self.scale  # (..., dim)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the embedding table's own layout (vocab, dim)."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scale


class LoraLayer(nn.Module):
    """Shared state of every LoRA layer: named updates, which one is active, which one is merged into `weight`."""

    def __init__(self) -> None:
        super().__init__()
        self.lora = nn.ModuleDict()  # adapter name -> LowRank / LowRankEmbedding
        self.active: str | None = None  # the adapter added in forward (None: base behaviour)
        self.merged: str | None = None  # the adapter whose ΔW is currently folded into `weight`
        self.disabled = False  # set by lorafit.disabled(): forward gives the base output

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name` in the layout of this layer's `weight`."""
        raise NotImplementedError

    def _adds_update(self) -> bool:
        """True when forward must add the active adapter's branch (not disabled, not already merged)."""
        if self.disabled and self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged into the weights; call lorafit.unmerge first")
        return self.active is not None and not self.disabled and self.merged != self.active


class LoraLinear(LoraLayer):
    """nn.Linear or GPT-2's Conv1D (fan_in_fan_out: weight stored (in, out)) plus named low-rank updates.

    Over a quantized base (a QuantLinear), `weight` is its QuantWeight, dequantized on the fly in base_forward.
    """

    row_split: tuple[bool, bool] = (False, False)  # base product in halves of rows: forward, backward (rowsplit)

    def __init__(self, base: nn.Module, fan_in_fan_out: bool = False):
        super().__init__()
        self.weight = base.weight  # the same Parameter objects: no copy, state-dict keys unchanged
        self.bias = base.bias
        self.fan_in_fan_out = fan_in_fan_out
        self.base_type = nn.Linear if isinstance(base, QuantLinear) else type(base)  # what `to_base` rebuilds
        in_f, out_f = self.weight.shape[::-1] if not fan_in_fan_out else self.weight.shape
        self.in_features, self.out_features = in_f, out_f

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str) -> None:
        """Attach a new update named `name` (B zero: the layer's output does not change)."""
        self.lora[name] = LowRank(self.in_features, self.out_features, r, scale, dropout, init).to(self.weight.device)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the base module's forward (nn.Linear, QuantLinear, or transformers' Conv1D: x @ W + b)."""
        if isinstance(self.weight, QuantWeight):
            return dequant_linear(x, self.weight, self.bias)
        if any(self.row_split):  # set by rowsplit.apply for a frozen bf16 weight on a CPU
            return rowsplit.linear(x, self.weight, self.bias, self.row_split)
        if not self.fan_in_fan_out:
            return F.linear(x, self.weight, self.bias)
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)  # (N, out), as Conv1D does it
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)  # (..., out)
        if self._adds_update():
            y = y + self.lora[self.active](x).to(y.dtype)
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora[name].delta_weight()  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def to_base(self) -> nn.Module:
        """A plain base module (same class as before injection) holding this layer's weight and bias."""
        if isinstance(self.weight, QuantWeight):
            return QuantLinear(self.weight, self.bias)
        with torch.device("meta"):
            if self.fan_in_fan_out:
                base = self.base_type(self.out_features, self.in_features)  # Conv1D(nf=out, nx=in)
            else:
                base = self.base_type(self.in_features, self.out_features, bias=self.bias is not None)
        base.weight, base.bias = self.weight, self.bias
        return base


class LoraEmbedding(LoraLayer):
    """nn.Embedding plus named low-rank updates (PEFT's lora_embedding_A / lora_embedding_B)."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.weight = base.weight
        self.bias = None
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.base_type = type(base)

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str) -> None:
        """Attach a new update named `name` (A zero: the layer's output does not change). No dropout on ids."""
        update = LowRankEmbedding(self.num_embeddings, self.embedding_dim, r, scale, init)
        self.lora[name] = update.to(self.weight.device)

    def base_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)  # (..., dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(ids)
        if self._adds_update():
            y = y + self.lora[self.active](ids, self).to(y.dtype)
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.lora[name].delta_weight()  # (vocab, dim)

    def to_base(self) -> nn.Module:
        with torch.device("meta"):
            base = self.base_type(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                  max_norm=self.max_norm, norm_type=self.norm_type,
                                  scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)
        base.weight = self.weight
        return base
