"""The LoRA maths: a frozen weight W0 plus a trainable low-rank update ΔW = B @ A * scale.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1:
h = W0 x + ΔW x = W0 x + B A x, with A (r, in) random and B (out, r) zero at start, so training starts exactly
at the base model. Everything else in lorafit (surgery, merging, files) is bookkeeping around this file.

A LoRA layer keeps the base module's `weight` and `bias` under their own names (the base state dict loads
unchanged) and holds its named low-rank updates in `self.lora[name]`. A base weight kept packed (quantized) is a
`PackedWeight` (lorafit.core.packed) that computes its own product; the class of an update is its variant
(lorafit.core.variants), plain LoRA being `LowRank`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .packed import PackedLinear, PackedWeight
from .variants import register, variant


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

    def add_to(self, y: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """The layer's output y (..., out) with this update added: y + B A x * scale."""
        return y + self(x).to(y.dtype)

    def fold(self, weight: torch.Tensor, delta: torch.Tensor, sign: float = 1.0,
             transposed: bool = False) -> torch.Tensor:
        """The dense base weight with ΔW (`delta`, in the weight's layout) folded in or, with sign -1, out.
        `transposed`: the weight is stored (in, out), as GPT-2's Conv1D stores it."""
        return merged_weight(weight, delta, sign)

    def bind(self, layer: LoraLinear) -> None:
        """Called once the update sits in `layer`; plain LoRA needs nothing of the base weight."""

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This update's tensors under the suffixes PEFT's files give them (after the module's path)."""
        return {".lora_A.weight": self.lora_A, ".lora_B.weight": self.lora_B}


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """W0 + sign * ΔW, computed in fp32 at least and returned in the weight's dtype (a pure function)."""
    work = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(work) + sign * delta.to(work)).to(weight.dtype)


register("lora", LowRank)


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

    def add_to(self, y: torch.Tensor, ids: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """The embedding's output y (..., dim) with this update added."""
        return y + self(ids, layer).to(y.dtype)

    def fold(self, weight: torch.Tensor, delta: torch.Tensor, sign: float = 1.0,
             transposed: bool = False) -> torch.Tensor:
        """The table with ΔW folded in or, with sign -1, out."""
        return merged_weight(weight, delta, sign)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This update's tensors under the suffixes PEFT's files give them."""
        return {".lora_embedding_A": self.lora_embedding_A, ".lora_embedding_B": self.lora_embedding_B}


class LoraLayer(nn.Module):
    """Shared state of every LoRA layer: named updates, which one is active, which one is merged into `weight`."""

    def __init__(self) -> None:
        super().__init__()
        self.lora = nn.ModuleDict()  # adapter name -> LowRank / LowRankEmbedding
        self.active: str | None = None  # the adapter added in forward (None: base behaviour)
        self.merged: str | None = None  # the adapter whose ΔW is currently folded into `weight`
        self.disabled = False  # set by lorafit.disabled(): forward gives the base output
        self.bank = None  # per-row adapters for mixed batches (lorafit.core.mixed.Bank), when attached

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name` in the layout of this layer's `weight`."""
        raise NotImplementedError

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the base module's forward."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)  # (..., out)
        if self.bank is not None and self.bank.routing.rows is not None:  # per-row adapters (core.mixed)
            delta = self.bank(x)
            return y if delta is None else y + delta.to(y.dtype)
        if self._adds_update():
            y = self.lora[self.active].add_to(y, x, self)
        return y

    def fold_adapter(self, name: str, sign: float = 1.0) -> None:
        """Fold adapter `name`'s update into `weight` (sign 1) or take it out (-1), through its variant."""
        if isinstance(self.weight, PackedWeight):  # a packed base becomes dense here, in the dtype it had
            self.weight = nn.Parameter(self.weight.dequantize(), requires_grad=False)
        transposed = getattr(self, "fan_in_fan_out", False)
        self.weight.copy_(self.lora[name].fold(self.weight, self.delta_weight(name), sign, transposed))

    def _adds_update(self) -> bool:
        """True when forward must add the active adapter's branch (not disabled, not already merged)."""
        if self.disabled and self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged into the weights; call lorafit.unmerge first")
        return self.active is not None and not self.disabled and self.merged != self.active


class LoraLinear(LoraLayer):
    """nn.Linear or GPT-2's Conv1D (fan_in_fan_out: weight stored (in, out)) plus named low-rank updates.

    Over a packed base (a PackedLinear), `weight` is its PackedWeight, which computes the base product itself.
    """

    # A faster way to the same frozen product, f(x, weight, bias), set on a layer by a runtime that timed one
    # on this machine; None: the plain product.
    base_product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    def __init__(self, base: nn.Module, fan_in_fan_out: bool = False):
        super().__init__()
        self.weight = base.weight  # the same Parameter objects: no copy, state-dict keys unchanged
        self.bias = base.bias
        self.fan_in_fan_out = fan_in_fan_out
        self.base_type = nn.Linear if isinstance(base, PackedLinear) else type(base)  # what `to_base` rebuilds
        in_f, out_f = self.weight.shape[::-1] if not fan_in_fan_out else self.weight.shape
        self.in_features, self.out_features = in_f, out_f

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str, kind: str = "lora") -> None:
        """Attach a new update named `name` of variant `kind` (B zero: the layer's output does not change)."""
        update = variant(kind)(self.in_features, self.out_features, r, scale, dropout, init)
        self.lora[name] = update.to(self.weight.device)
        update.bind(self)  # a variant that starts from the base weight (DoRA's magnitudes) reads it here

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the base module's forward (nn.Linear, PackedLinear, or transformers' Conv1D: x @ W + b)."""
        if isinstance(self.weight, PackedWeight):
            return self.weight.linear(x, self.bias)
        if self.base_product is not None:
            return self.base_product(x, self.weight, self.bias)
        if not self.fan_in_fan_out:
            return F.linear(x, self.weight, self.bias)
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)  # (N, out), as Conv1D does it
        return out.view(*x.shape[:-1], self.out_features)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora[name].delta_weight()  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def to_base(self) -> nn.Module:
        """A plain base module (same class as before injection) holding this layer's weight and bias."""
        if isinstance(self.weight, PackedWeight):
            return PackedLinear(self.weight, self.bias)
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

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str, kind: str = "lora") -> None:
        """Attach a new update named `name` (A zero: the layer's output does not change). No dropout on ids."""
        if kind != "lora":
            raise ValueError(f"LoRA variant {kind!r} has no form for embedding tables; only plain LoRA has")
        update = LowRankEmbedding(self.num_embeddings, self.embedding_dim, r, scale, init)
        self.lora[name] = update.to(self.weight.device)

    def base_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)  # (..., dim)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.lora[name].delta_weight()  # (vocab, dim)

    def to_base(self) -> nn.Module:
        with torch.device("meta"):
            base = self.base_type(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                  max_norm=self.max_norm, norm_type=self.norm_type,
                                  scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)
        base.weight = self.weight
        return base
