"""The tensor maths of combining adapters, one module at a time: weighted sums, TIES, DARE and an SVD split.

Task arithmetic adds weighted task updates (Ilharco et al. 2023, "Editing models with task arithmetic"). TIES
(Yadav et al. 2023, section 3) keeps each update's largest entries, elects one sign per entry and averages only
the kept entries that agree with it. DARE (Yu et al. 2024, section 3) drops each entry at random with probability
1 - density and rescales the survivors by 1 / density, so the expected update is unchanged. The functions take a
list of same-shaped tensors (one per adapter) and their weights; `lorafit.core.combine` decides which tensors
(LoRA A, B or ΔW = BA) and which weights, as PEFT's `add_weighted_adapter` does.
"""

from __future__ import annotations

import torch


def _stacked_weights(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """The weights as fp32, shaped to broadcast over a stack of tensors shaped like `like` (n, 1, ..., 1)."""
    return torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * (like.dim() - 1)))


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i t_i: task arithmetic, and the last step of DARE."""
    stack = torch.stack(tensors)  # (n, ...)
    return (stack * _stacked_weights(weights, stack)).sum(dim=0)  # (...)


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density * numel) largest-magnitude entries set to zero (TIES's trim step)."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)  # (numel,)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k=int(density * flat.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


def drop_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop: each entry survives with probability `density` and is scaled by 1 / density; one Bernoulli
    draw per entry from `generator`, in the tensor's order (none at all when density >= 1)."""
    if density >= 1:
        return tensor
    survives = torch.bernoulli(torch.full_like(tensor, density), generator=generator)  # 0/1, like tensor
    return tensor * survives / density


def ties(tensors: list[torch.Tensor], weights: list[float], density: float, majority: str = "total") -> torch.Tensor:
    """TIES-merging: trim each tensor to its largest entries, elect a sign per entry, and average the weighted
    kept entries of that sign.

    The sign is elected on the trimmed tensors before weighting: "total" takes the sign of their sum, "frequency"
    the sign most of them have (a tie counts as positive). An entry no tensor keeps with that sign is zero.
    """
    trimmed = torch.stack([keep_largest(t, density) for t in tensors])  # (n, ...)
    signs = trimmed.sign()  # (n, ...), 0 where trimmed
    votes = trimmed.sum(dim=0) if majority == "total" else signs.sum(dim=0)  # (...)
    elected = torch.where(votes >= 0, 1.0, -1.0)  # (...)
    agrees = signs == elected  # (n, ...): kept and of the elected sign
    weighted = trimmed * _stacked_weights(weights, trimmed)  # (n, ...)
    kept = agrees.sum(dim=0).clamp(min=1)  # (...): how many tensors the entry's average is over
    return (weighted * agrees).sum(dim=0) / kept


def dare_linear(tensors: list[torch.Tensor], weights: list[float], density: float,
                generator: torch.Generator) -> torch.Tensor:
    """DARE, then task arithmetic: Σ w_i drop_random(t_i); the tensors draw their masks in list order."""
    return weighted_sum([drop_random(t, density, generator) for t in tensors], weights)


def low_rank_split(delta: torch.Tensor, rank: int, clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-`rank` approximation of `delta` (Eckart-Young): B = U_r diag(S_r), A = V_r^T.

    `clamp` (a quantile in (0, 1]) bounds every entry of B and A to ± that quantile of their entries together,
    as kohya's sd-scripts and PEFT do, to tame outliers; None leaves them as they are.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in) with k = min(out, in)
    b = u[:, :rank] * s[:rank]  # (out, rank)
    a = vh[:rank, :]  # (rank, in)
    if clamp is not None:
        limit = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-limit, limit), a.clamp(-limit, limit)
    return b, a
