"""The fast path: precision and device names, the bf16 base against fp32, compiled and checkpointed blocks."""

import pytest
import torch

import lorafit
from lorafit.training.loss import causal_lm_loss
from lorafit.training.runtime import (
    COMPILE_PAYS_AFTER,
    cast_frozen,
    compile_would_pay,
    compiler_problem,
    evaluation,
    prepare,
    resolve_compile,
    resolve_device,
    resolve_precision,
    training,
)
from tests.conftest import lm_batch, randomize_lora, tiny_llama


def test_bf16_base_keeps_lora_fp32_ties_and_stays_close_to_fp32():
    model = lorafit.inject(tiny_llama(), lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as SmolLM2 does
    randomize_lora(model)
    exact = causal_lm_loss(model, lm_batch()).item()
    assert cast_frozen(model, torch.bfloat16) > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    fast = causal_lm_loss(model, lm_batch())
    fast.backward()
    assert abs(fast.item() - exact) < 0.02 * exact
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_precision_names():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("auto") in ("bf16", "fp32")
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        resolve_precision("fp16")


def test_compile_auto_turns_on_only_for_long_unquantized_bf16_runs_on_a_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert compile_would_pay(COMPILE_PAYS_AFTER, cpu, "bf16")
    assert not compile_would_pay(COMPILE_PAYS_AFTER - 1, cpu, "bf16")
    assert not compile_would_pay(10 * COMPILE_PAYS_AFTER, cpu, "fp32")
    assert not compile_would_pay(10 * COMPILE_PAYS_AFTER, gpu, "bf16")  # never measured there
    assert resolve_compile("auto", COMPILE_PAYS_AFTER, cpu, "bf16", quantized=False) == (
        True, f"auto: {COMPILE_PAYS_AFTER} steps in bf16 on a CPU")  # this machine builds C++: the tests compile
    assert not resolve_compile("auto", COMPILE_PAYS_AFTER, cpu, "bf16", quantized=True)[0]
    assert not resolve_compile("auto", COMPILE_PAYS_AFTER - 1, cpu, "bf16", quantized=False)[0]
    assert resolve_compile(True, 1, cpu, "fp32", quantized=True) == (True, "as asked")
    assert resolve_compile(False, 10 * COMPILE_PAYS_AFTER, cpu, "bf16", quantized=False) == (False, "as asked")


def test_compile_auto_stays_off_and_says_why_without_a_working_cpp_compiler():
    import torch._inductor.config as inductor_config

    compiler_problem.cache_clear()
    torch._dynamo.reset()
    try:
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
            compiled, why = resolve_compile("auto", COMPILE_PAYS_AFTER, torch.device("cpu"), "bf16", quantized=False)
    finally:
        compiler_problem.cache_clear()
        torch._dynamo.reset()
    assert not compiled
    assert why.startswith("auto: torch.compile does not work here (") and "/nonexistent/c++" in why


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
        loss = causal_lm_loss(model, lm_batch())
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
            losses.append(causal_lm_loss(m, lm_batch()))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    grads = [torch.autograd.grad(loss, ps) for loss, ps in zip(losses, params)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    with torch.no_grad(), evaluation("fp32", compiled):  # evaluation runs the blocks eagerly
        torch.testing.assert_close(compiled(**lm_batch()).logits, eager(**lm_batch()).logits)
