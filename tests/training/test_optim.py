"""The learning-rate schedule as a pure function, and the optimizer over trainable parameters only."""

import copy
import math

import pytest
import torch

import lorafit
from lorafit.training.optim import lr_at, make_optimizer


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    assert lr_at(0, 1.0, warmup_steps=4, total_steps=20) == pytest.approx(0.25)
    assert lr_at(3, 1.0, warmup_steps=4, total_steps=20) == pytest.approx(1.0)
    assert lr_at(4, 1.0, warmup_steps=4, total_steps=20) == pytest.approx(1.0)
    mid = 4 + 8  # half way through the cosine
    assert lr_at(mid, 1.0, 4, 20, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(20, 1.0, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    lrs = [lr_at(s, 1.0, 4, 20) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_optimizer_holds_only_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["0"]))
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(held) == 2


def test_optimizer_without_trainable_parameters_is_an_error():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model, 1e-3, 0.0)


def test_optimizer_is_fused_and_steps_like_the_per_tensor_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["0", "1"]))
    twin = copy.deepcopy(model)
    fused = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1,
                              foreach=False)
    assert fused.defaults["fused"]
    x = torch.randn(4, 6)
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, msg=name)
