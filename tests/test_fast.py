"""The fast path against the plain computation: chunked loss vs float64 cross-entropy, vs transformers' loss."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_lora, tiny_gpt2, tiny_llama

import lorafit
from lorafit.fast import (
    COMPILE_PAYS_AFTER,
    cast_frozen,
    causal_lm_loss,
    compile_would_pay,
    evaluation,
    linear_cross_entropy,
    output_layer,
    prepare,
    resolve_device,
    resolve_precision,
    training,
)


def batch(seed: int = 0) -> dict:
    """Two padded rows; the first tokens of each are a masked prompt, as in instruction tuning."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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


def test_linear_cross_entropy_refuses_a_trainable_output_layer():
    with pytest.raises(ValueError, match="must be frozen"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1]))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_causal_lm_loss_equals_transformers_loss_and_lora_gradients(make):
    model = lorafit.inject(make(), lorafit.LoraConfig(r=4, targets="all-linear"))
    randomize_lora(model)
    assert output_layer(model) is not None  # the chunked path is the one under test
    params = [p for p in model.parameters() if p.requires_grad]
    ours = causal_lm_loss(model, batch(), chunk=5)
    ours_grads = torch.autograd.grad(ours, params)
    ref = model(**batch()).loss
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_models_with_a_trained_or_scaled_output_layer_take_their_own_forward():
    model = lorafit.inject(tiny_llama(), lorafit.LoraConfig(targets=["q_proj"], modules_to_save=["lm_head"]))
    assert output_layer(model) is None
    torch.testing.assert_close(causal_lm_loss(model, batch()), model(**batch()).loss)
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert output_layer(capped) is None


def test_bf16_base_keeps_lora_fp32_ties_and_stays_close_to_fp32():
    model = lorafit.inject(tiny_llama(), lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as SmolLM2 does
    randomize_lora(model)
    exact = causal_lm_loss(model, batch()).item()
    assert cast_frozen(model, torch.bfloat16) > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    fast = causal_lm_loss(model, batch())
    fast.backward()
    assert abs(fast.item() - exact) < 0.02 * exact
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_precision_names():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("auto") in ("bf16", "fp32")
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        resolve_precision("fp16")


def test_compile_is_suggested_only_for_long_bf16_runs_on_a_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert compile_would_pay(COMPILE_PAYS_AFTER, cpu, "bf16")
    assert not compile_would_pay(COMPILE_PAYS_AFTER - 1, cpu, "bf16")
    assert not compile_would_pay(10 * COMPILE_PAYS_AFTER, cpu, "fp32")
    assert not compile_would_pay(10 * COMPILE_PAYS_AFTER, gpu, "bf16")  # never measured there


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda': this torch sees no CUDA device"):
            resolve_device("cuda")


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients():
    grads = []
    for checkpointing in (False, True):
        model = lorafit.inject(tiny_llama(), lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"], dropout=0.0))
        randomize_lora(model)
        prepare(model, "fp32", checkpointing=checkpointing)
        model.train()
        loss = causal_lm_loss(model, batch())
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    assert model.model.gradient_checkpointing
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_compiled_blocks_give_the_eager_loss_and_gradients_and_keep_the_keys():
    """train.compile: the same function, compiled (inductor); state-dict keys (and so adapter files) unchanged."""
    models = []
    for compile_blocks in (False, True):
        model = lorafit.inject(tiny_llama(), lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
        randomize_lora(model)
        prepare(model, "fp32", compile_blocks=compile_blocks)
        models.append(model.train())
    eager, compiled = models
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    losses = []
    for m in models:
        with training("fp32", m):  # compiled under the activation budget: some activations are recomputed
            losses.append(causal_lm_loss(m, batch()))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    grads = [torch.autograd.grad(loss, ps) for loss, ps in zip(losses, params)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    with torch.no_grad(), evaluation("fp32", compiled):  # evaluation runs the blocks eagerly
        torch.testing.assert_close(compiled(**batch()).logits, eager(**batch()).logits)
