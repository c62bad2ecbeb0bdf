"""The learning-rate schedule as a pure function, and the optimizer over trainable parameters only."""

import copy
import math

import pytest
import torch

import lorafit
from lorafit.training.optim import lr_at, make_optimizer, set_lr
from tests.conftest import tiny_bert


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


# --- LoRA+ ---

def _peft_to_ours(name: str) -> str:
    """PEFT's parameter name -> lorafit's (the same parameter of the same base model)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.default.weight", f".lora.default.{part}")
    for part in ("lora_embedding_A", "lora_embedding_B"):
        name = name.replace(f".{part}.default", f".lora.default.{part}")
    return name


def _loraplus_pair():
    """(lorafit model, PEFT model) of tiny BERT: LoRA on Linear and embedding layers, LoRA-only biases, a head and
    LayerNorms trained in full; every kind of parameter LoRA+ sorts."""
    peft = pytest.importorskip("peft")
    targets, save = ["query", "value", "word_embeddings"], ["classifier", "LayerNorm"]
    ours = lorafit.inject(tiny_bert(), lorafit.LoraConfig(r=4, targets=targets, bias="lora_only", modules_to_save=save))
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=targets, bias="lora_only",
                                                              modules_to_save=save))
    return ours, theirs, peft


def _settings(optimizer, names: dict) -> dict:
    """{parameter name: (lr, weight_decay)} of an optimizer's groups."""
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_loraplus_groups_match_pefts_create_loraplus_optimizer():
    ours, theirs, peft = _loraplus_pair()
    from peft.optimizers import create_loraplus_optimizer

    mine = make_optimizer(ours, lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=16.0, loraplus_lr_embedding=1e-5)
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                    loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-5)
    got = _settings(mine, {id(p): n for n, p in ours.named_parameters()})
    want = _settings(ref, {id(p): _peft_to_ours(n) for n, p in theirs.named_parameters()})
    assert got == want
    assert {(lr, wd) for lr, wd in got.values()} == {(1e-3, 0.1), (1e-5, 0.1), (16e-3, 0.1), (16e-3, 0.0)}
    assert got["bert.encoder.layer.0.attention.self.query.lora.default.lora_B"] == (16e-3, 0.1)
    assert got["bert.encoder.layer.0.attention.self.query.bias"] == (16e-3, 0.0)


def test_loraplus_step_equals_pefts_on_the_same_gradients():
    ours, theirs, peft = _loraplus_pair()
    from peft.optimizers import create_loraplus_optimizer

    mine = make_optimizer(ours, lr=1e-2, weight_decay=0.1, loraplus_lr_ratio=8.0)
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=8.0,
                                    loraplus_weight_decay=0.1)
    params = dict(ours.named_parameters())
    pairs = [(params[_peft_to_ours(n)], p) for n, p in theirs.named_parameters() if p.requires_grad]
    assert len(pairs) == sum(p.requires_grad for p in ours.parameters())
    with torch.no_grad():
        for i, (a, b) in enumerate(pairs):
            a.normal_(generator=torch.Generator().manual_seed(i))
            b.copy_(a)
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(1000 + i))
            b.grad = a.grad.clone()
    before = [a.detach().clone() for a, _ in pairs]
    mine.step()
    ref.step()
    for (a, b), old in zip(pairs, before, strict=True):
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, old)


def test_the_schedule_scales_every_loraplus_group_and_a_plain_optimizer_has_one_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["0"], bias="all"))
    assert len(make_optimizer(model, lr=1e-3, weight_decay=0.0).param_groups) == 1
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0, loraplus_lr_ratio=4.0)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 2]  # A; B; the two biases
    set_lr(opt, 5e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 2e-3, 2e-3])
