"""Row-halved frozen products against the plain ones: values, input gradients, model surgery, compiled blocks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import lorafit
from lorafit.core.lora import LoraLinear
from lorafit.training.cpu import rowsplit
from lorafit.training.cpu.rowsplit import RowSplitLinear
from lorafit.training.loss import causal_lm_loss
from lorafit.training.runtime import cast_frozen, prepare, training
from tests.conftest import randomize_lora, tiny_llama


def frozen(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(shape, generator=gen).to(dtype), requires_grad=False)


def ids(seed: int = 0) -> dict:
    batch = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch}


@pytest.mark.parametrize("split", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("rows", [7, 1, 12])
def test_halved_products_equal_the_float64_linear_and_its_input_gradient(split, rows):
    weight, bias = frozen((5, 6), torch.float32, 0), frozen((5,), torch.float32, 1)
    x = torch.randn(rows, 2, 6, requires_grad=True)  # 3-d input: (rows, 2) positions
    grad = torch.randn(rows, 2, 5)
    y = rowsplit.linear(x, weight, bias, split)
    (gx,) = torch.autograd.grad(y, x, grad)
    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(x64, weight.double(), bias.double())
    (gx64,) = torch.autograd.grad(y64, x64, grad.double())
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx64.float(), rtol=1e-5, atol=1e-5)


def test_halved_bf16_products_equal_the_whole_bf16_product():
    weight = frozen((40, 24), torch.bfloat16, 0)
    x = torch.randn(64, 24).to(torch.bfloat16)
    whole = rowsplit.product(x, weight.T, halves=False)
    torch.testing.assert_close(rowsplit.product(x, weight.T, halves=True), whole, rtol=0.01, atol=0.02)
    torch.testing.assert_close(whole.float(), x.float() @ weight.float().T, rtol=0.01, atol=0.05)


@pytest.mark.parametrize("layout", ["transposed", "offset rows", "every other column"])
def test_halved_products_of_strided_views_equal_the_plain_product(layout):
    """The first half is taken as a strided view of the input: it must follow any layout, offset included."""
    base = torch.randn(30, 21, dtype=torch.float64)
    a = {"transposed": base[:8].T, "offset rows": base[5:26, :8], "every other column": base[4:15, ::2]}[layout]
    b = torch.randn(a.shape[1], 6, dtype=torch.float64)
    assert not a.is_contiguous() or a.storage_offset() > 0
    torch.testing.assert_close(rowsplit.product(a, b, halves=True), a @ b, rtol=1e-12, atol=1e-12)


def test_linear_refuses_a_trainable_weight():
    with pytest.raises(ValueError, match="must be frozen"):
        rowsplit.linear(torch.randn(2, 3), nn.Parameter(torch.randn(4, 3)), None, (True, True))


def test_apply_reroutes_frozen_bf16_linears_and_keeps_keys_values_and_the_loss(monkeypatch):
    monkeypatch.setattr(rowsplit, "halves_pay", lambda rows, b: True)  # as if halves were timed faster
    model = lorafit.inject(tiny_llama(), lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize_lora(model)
    cast_frozen(model, torch.bfloat16)
    prepare(model, "bf16")  # rows=0: nothing timed, nothing rerouted
    assert not any(isinstance(m, RowSplitLinear) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = causal_lm_loss(model, ids())
    choices = rowsplit.apply(model, rows=30, skip=model.lm_head)
    assert set(choices) == {(64, 64), (32, 64), (96, 64), (64, 96)} and all(all(c) for c in choices.values())
    layer = model.model.layers[0]
    assert type(layer.mlp.down_proj) is RowSplitLinear and type(model.lm_head) is nn.Linear
    q_proj = layer.self_attn.q_proj
    assert isinstance(q_proj, LoraLinear) and q_proj.base_product.keywords["split"] == (True, True)
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
    halved = causal_lm_loss(model, ids())
    torch.testing.assert_close(halved, loss, rtol=0.01, atol=0.01)
    halved.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert rowsplit.describe(choices).startswith("64x64 forward and backward")


def test_only_frozen_bf16_cpu_weights_are_timed():
    model = tiny_llama()  # fp32, nothing trains: no bf16 weight
    assert rowsplit.apply(model, rows=30) == {}
    assert rowsplit.describe({(4, 8): (False, False)}) == "none"
    assert rowsplit.describe({(4, 8): (False, True)}) == "4x8 backward"


def bf16_lora_model(**prepare_options) -> nn.Module:
    """A tiny Llama with a non-zero LoRA, frozen base in bf16, prepared for training with `prepare_options`."""
    model = lorafit.inject(tiny_llama(), lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"], dropout=0.0))
    randomize_lora(model)
    cast_frozen(model, torch.bfloat16)
    prepare(model, "bf16", rows=30, **prepare_options)
    return model.train()


def loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    with training("bf16", model):
        loss = causal_lm_loss(model, ids())
    return loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def test_compiled_blocks_with_halved_products_give_the_eager_loss_and_gradients(monkeypatch):
    monkeypatch.setattr(rowsplit, "halves_pay", lambda rows, b: True)
    counters.clear()
    (loss, grads), (compiled_loss, compiled_grads) = [loss_and_grads(bf16_lora_model(compile_blocks=c))
                                                      for c in (False, True)]
    torch.testing.assert_close(compiled_loss, loss, rtol=0.01, atol=0.01)
    assert not counters["graph_break"]  # the halves compile into the block's graph
    for a, b in zip(grads, compiled_grads):
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.02 * a.abs().max().item())


def test_halved_products_recompute_under_gradient_checkpointing(monkeypatch):
    monkeypatch.setattr(rowsplit, "halves_pay", lambda rows, b: True)
    (loss, grads), (ckpt_loss, ckpt_grads) = [loss_and_grads(bf16_lora_model(checkpointing=c)) for c in (False, True)]
    torch.testing.assert_close(ckpt_loss, loss)
    for a, b in zip(grads, ckpt_grads):
        torch.testing.assert_close(b, a)
