"""MeZO (Malladi et al. 2023): fine-tuning with forward passes only, at inference memory.

One step estimates the gradient along a random direction z ~ N(0, I) from two forward passes,

    g = (L(θ + εz) - L(θ - εz)) / 2ε          (a scalar: the projected gradient)
    θ ← θ - lr · (g · z + weight_decay · θ)

and never stores z: it is regenerated from a seed each time it is needed (perturb, perturb back, update), so the
only memory beyond inference is one parameter-sized random tensor at a time. No backward pass, no activations
kept, no gradients, no optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.surgery import inject
from .registry import Method, register


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD as a torch optimizer: `step(closure)` calls the loss closure twice, under no_grad.

    Its state is only the step count (the seeds derive from it and `seed`), so checkpoints and `--resume` work
    as for AdamW.
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.state["mezo"] = {"step": 0, "seed": seed}

    def _walk(self, seed: int, scale: Callable[[dict], float]) -> None:
        """θ += scale(group) · z for every parameter, z drawn afresh from `seed` in a fixed order."""
        gen = torch.Generator().manual_seed(seed)
        for group in self.param_groups:
            for p in group["params"]:
                z = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)  # like p
                p.add_(z, alpha=scale(group))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One MeZO step; `closure` returns the loss at the current parameters. Returns the loss at θ + εz."""
        state = self.state["mezo"]
        seed = state["seed"] * 1_000_003 + state["step"]
        self._walk(seed, lambda g: g["eps"])  # θ + εz
        loss_plus = closure().double()
        self._walk(seed, lambda g: -2 * g["eps"])  # θ - εz
        loss_minus = closure().double()
        self._walk(seed, lambda g: g["eps"])  # back to θ
        projected = ((loss_plus - loss_minus) / (2 * self.param_groups[0]["eps"])).item()
        for group in self.param_groups:
            if group["weight_decay"]:
                for p in group["params"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
        self._walk(seed, lambda g: -g["lr"] * projected)  # θ - lr·g·z
        state["step"] += 1
        state["projected_grad"] = projected
        return loss_plus


def _uses_lora(options) -> bool:
    return options.mezo_params == "lora"


def _setup(model: torch.nn.Module, options, lora) -> None:
    if _uses_lora(options):
        inject(model, lora)
    else:
        model.requires_grad_(True)


register(Method("mezo", "forward-only zeroth-order optimiser over LoRA or all parameters (Malladi et al. 2023)",
                setup=_setup, uses_lora=_uses_lora, trains_base=lambda options: not _uses_lora(options),
                optimizer=lambda params, lr, weight_decay, seed, options: MeZO(params, lr, options.mezo_eps,
                                                                                weight_decay, seed)))
