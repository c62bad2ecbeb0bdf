"""The chunked next-token loss against the plain computation: float64 cross-entropy and transformers' own loss."""

import math

import pytest
import torch
import torch.nn.functional as F

import lorafit
from lorafit.training import loss as loss_module
from lorafit.training.loss import causal_lm_loss, linear_cross_entropy, output_layer
from tests.conftest import lm_batch, randomize_lora, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("chunk", [3, 128])
def test_linear_cross_entropy_matches_float64_loss_and_gradient(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=gen, requires_grad=True)
    weight, bias = torch.randn(50, 16, generator=gen), torch.randn(50, generator=gen)
    targets = torch.randint(0, 50, (10,), generator=gen)
    loss = linear_cross_entropy(hidden, weight, targets, bias, chunk=chunk)
    (grad,) = torch.autograd.grad(2.0 * loss, hidden)  # a non-unit upstream gradient reaches the result
    h64 = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, weight.double(), bias.double()), targets)
    (ref_grad,) = torch.autograd.grad(2.0 * ref, h64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the loss-only branch (evaluation) agrees too
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, bias, chunk), loss)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_under_bf16_autocast_stays_near_the_float64_loss(bias):
    """The fast path's setting: bf16 hidden states and head, products in bf16, softmax and loss in fp32."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 64, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(300, 64, generator=gen).div(8).bfloat16()
    b = torch.randn(300, generator=gen).bfloat16() if bias else None
    targets = torch.randint(0, 300, (37,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, b, chunk=16)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    h64 = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, weight.double(), None if b is None else b.double()), targets)
    (ref_grad,) = torch.autograd.grad(ref, h64)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-2)  # bf16 logits: about 3 digits
    torch.testing.assert_close(grad.double(), ref_grad, rtol=5e-2, atol=2e-3)


def test_bf16_loss_with_a_gradient_is_the_fp32_softmax_loss_to_the_rounding_of_a_probability():
    """With a gradient to compute, bf16 logits go through a bf16-writing softmax and the loss is -log of each
    target's bf16 probability; without one, the fp32 passes run. Same logits both ways (same products)."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 64, generator=gen).bfloat16()
    weight = torch.randn(1000, 64, generator=gen).div(3).bfloat16()
    targets = torch.randint(0, 1000, (300,), generator=gen)
    exact = linear_cross_entropy(hidden, weight, targets)  # no gradient: fp32 softmax over the same logits
    loss = linear_cross_entropy(hidden.clone().requires_grad_(), weight, targets)
    assert loss.dtype == torch.float32 and 2.0 < exact.item() < 20.0
    assert abs(loss.item() - exact.item()) < 2**-8  # per token at most the relative rounding of a bf16 number
    assert loss.item() != exact.item()  # the two paths did differ (else this test checks nothing)


def test_a_probability_that_underflows_bf16_takes_its_loss_from_the_logits():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).bfloat16().requires_grad_()
    weight = torch.tensor([[200.0, 0.0], [-100.0, 0.0], [0.0, 1.0]]).bfloat16()  # target 1 of row 0: 300 below
    targets = torch.tensor([1, 2])
    loss = linear_cross_entropy(hidden, weight, targets)
    (grad,) = torch.autograd.grad(loss, hidden)
    h64 = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ weight.double().T, targets)
    (ref_grad,) = torch.autograd.grad(ref, h64)
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2)


def test_linear_cross_entropy_refuses_a_trainable_output_layer():
    with pytest.raises(ValueError, match="must be frozen"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1]))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_causal_lm_loss_equals_transformers_loss_and_lora_gradients(make):
    model = lorafit.inject(make(), lorafit.LoraConfig(r=4, targets="all-linear"))
    randomize_lora(model)
    assert output_layer(model) is not None  # the chunked path is the one under test
    params = [p for p in model.parameters() if p.requires_grad]
    ours = causal_lm_loss(model, lm_batch(), chunk=5)
    ours_grads = torch.autograd.grad(ours, params)
    ref = model(**lm_batch()).loss
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_models_with_a_trained_or_scaled_output_layer_take_their_own_forward():
    model = lorafit.inject(tiny_llama(), lorafit.LoraConfig(targets=["q_proj"], modules_to_save=["lm_head"]))
    assert output_layer(model) is None
    torch.testing.assert_close(causal_lm_loss(model, lm_batch()), model(**lm_batch()).loss)
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert output_layer(capped) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_of_rows_and_kept_buffers_give_the_float64_loss_and_gradient(dtype, monkeypatch):
    """Several product blocks with a ragged last one, softmax passes and gradient products that cut across them,
    and calls of growing and shrinking size that reuse the kept buffers."""
    vocab, width = 50, 16
    monkeypatch.setattr(loss_module, "PRODUCT_BYTES", 7 * vocab * torch.tensor([], dtype=dtype).element_size())
    monkeypatch.setattr(loss_module, "GRADIENT_ROWS", 3)
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(vocab, width, generator=gen).to(dtype)
    for rows in (10, 23, 4):  # 7-row blocks: 7+3, 7+7+7+2, 4
        hidden = torch.randn(rows, width, generator=gen).to(dtype).requires_grad_()
        targets = torch.randint(0, vocab, (rows,), generator=gen)
        loss = linear_cross_entropy(hidden, weight, targets, chunk=2)
        (grad,) = torch.autograd.grad(loss, hidden)
        h64 = hidden.detach().double().requires_grad_()
        ref = F.cross_entropy(F.linear(h64, weight.double()), targets)
        (ref_grad,) = torch.autograd.grad(ref, h64)
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(loss.double(), ref, **tol)
        torch.testing.assert_close(grad.double(), ref_grad, **tol)
