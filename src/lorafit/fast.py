"""The fast training path: a frozen bf16 base, fp32 LoRA weights and optimizer, and a loss that skips the logits.

Where the time of a LoRA step goes on a CPU (SmolLM2-135M, 8 x 128 tokens): the frozen weights need no gradient,
so a step is about two forward passes of matrix multiplies, which bf16 matrix units run ~7x faster than fp32.
What is left besides them is mostly the output layer: a (tokens x 49,152) logits tensor in fp32, its
log-softmax and its gradient, hundreds of MB written and read back on every step. `linear_cross_entropy` never
builds it: it walks the tokens in chunks small enough to stay in cache, computing each chunk's loss and its
gradient with respect to the hidden states at once (the gradient is kept for backward). Prompt tokens whose
label is masked (-100) are dropped before the output layer, so an instruction-tuning step pays only for the
answer tokens.

No maintained library does this on CPU: the fused linear-cross-entropy kernels that exist (Liger, Apple's
cut-cross-entropy) are Triton kernels for GPUs.

`precision="fp32"` is the exact path: every tensor stays fp32 and the loss equals transformers' own to float
rounding (tests compare the two). `precision="bf16"` casts the frozen weights to bf16; the trainable weights
(LoRA A and B, a classifier head) and the optimizer stay fp32, and LoRA's branch computes in fp32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from . import rowsplit
from .methods.virtual import virtual_inputs
from .quant.linear import QuantLinear, compute_dtype

PRECISIONS = ("auto", "bf16", "fp32")
ACTIVATION_BUDGET = 0.7  # share of its activations a compiled block keeps for backward; it recomputes the rest
COMPILE_PAYS_AFTER = 330  # steps after which compiling paid for itself (SmolLM2 example, AMX CPU, empty cache)
CHUNK = 128  # rows of logits per chunk: 128 x 49,152 fp32 is 24 MiB, under glibc's 32 MiB mmap threshold
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def resolve_device(requested: str) -> torch.device:
    """"auto" -> the GPU where CUDA has one, else the CPU; "cpu", "cuda" and "cuda:N" are taken as asked."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)  # raises on a name torch does not know
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r}: this torch sees no CUDA device (torch.cuda.is_available() is "
                         "False); use device cpu or auto")
    return device


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """True when `device` multiplies bf16 matrices natively (a CUDA GPU that does, or a CPU with AVX512-BF16 or AMX)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> str:
    """"auto" -> "bf16" where `device` supports it, else "fp32"; "bf16" and "fp32" are taken as asked."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return requested


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen floating-point parameter to `dtype` in place (tied weights stay tied); returns how many.

    Trainable parameters keep their dtype: LoRA's A and B and a new head are trained (and saved) in fp32.
    """
    count = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += 1
    return count


def dtype_for(precision: str) -> torch.dtype:
    """The dtype the frozen base is loaded in for a resolved precision."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(precision: str, model: nn.Module):
    """bf16 autocast on the model's device for precision "bf16" (a no-op for "fp32").

    Autocast lets fp32 trainable weights (LoRA's A and B, a head) meet the bf16 activations of the frozen base:
    their products run in bf16, their gradients and optimizer state stay fp32.
    """
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def training(precision: str, model: nn.Module):
    """autocast(precision, model) for a training forward pass. Blocks compiled in it keep ACTIVATION_BUDGET of
    their activations for backward and recompute the cheapest rest (the compiler's activation memory budget).

    Measured on SmolLM2-135M, batch 8 x 128, on an AMX CPU: peak RSS 1,430 -> 1,220 MB at an unchanged step time
    (0.86 s and 0.85 s, interleaved); 0.5 saved no more. Eager blocks ignore it.
    """
    import torch._functorch.config as functorch_config  # the budget is read when a block is compiled

    with functorch_config.patch(activation_memory_budget=ACTIVATION_BUDGET), autocast(precision, model):
        yield


@contextlib.contextmanager
def evaluation(precision: str, model: nn.Module):
    """autocast(precision, model), with compiled blocks run eagerly: generation's shapes and no-grad graphs
    would each cost a compile of their own, for a few forward passes."""
    with torch.compiler.set_stance("force_eager"), autocast(precision, model):
        yield


def prepare(model: nn.Module, precision: str, checkpointing: bool = False, compile_blocks: bool = False,
            rows: int = 0) -> dict[tuple[int, int], tuple[bool, bool]]:
    """Set up a model (frozen base already loaded in dtype_for(precision), adapters injected) for training.

    Trainable parameters go to fp32. With bf16 on a CPU, attention runs eagerly: at the sequence lengths
    fine-tuning uses, the backward of PyTorch's CPU flash-attention kernel is slower than plain matrix products
    (a GPU keeps the model's own attention).
    `checkpointing` keeps only each block's input for backward and recomputes the rest (transformers' own
    gradient checkpointing, non-reentrant, which works with a frozen embedding). `compile_blocks` compiles each
    transformer block in place (see `compile_model_blocks`). `rows` (tokens per batch, 0 for unknown): with
    bf16 on a CPU, the frozen Linear products are timed at that many rows and computed in halves where that runs
    faster (`rowsplit.apply`, whose choices are returned; {} when not timed).
    """
    if checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    on_cpu = next(model.parameters()).device.type == "cpu"
    if precision == "bf16" and on_cpu and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    choices = {}
    if precision == "bf16" and on_cpu and rows > 1:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        choices = rowsplit.apply(model, rows, skip=head)
    if compile_blocks:
        compile_model_blocks(model)
    return choices


def compile_would_pay(steps: int, device: torch.device, precision: str) -> bool:
    """True for a run long enough that compiled blocks likely save more than compiling costs (bf16 on a CPU, the
    only place it was measured); `lorafit train` then suggests `train.compile`, which stays opt-in."""
    return device.type == "cpu" and precision == "bf16" and steps >= COMPILE_PAYS_AFTER


def compile_model_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block in place (inductor); returns how many. State-dict keys do not change.

    On a CPU step most of the time outside the matrix products goes to small elementwise kernels (RMSNorm in
    fp32, rotary embeddings, SiLU times up-projection, dtype casts), each a pass over memory; inductor fuses them.
    One block's code serves all of them, compiled once with dynamic shapes (batches differ in length). The price
    is the first step: tens of seconds of compiling, so it pays on longer runs.
    """
    from .methods.select import blocks_of

    _, blocks = blocks_of(model)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
    """The training loss of `batch`: the chunked next-token loss for language models, the model's own otherwise.

    Virtual tokens (prefix / prompt tuning) go in here, through `virtual_inputs`.
    """
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape == batch["input_ids"].shape:
        return causal_lm_loss(model, batch)
    return model(**virtual_inputs(model, batch)[0]).loss


def output_layer(model: nn.Module) -> tuple[nn.Module, nn.Linear | QuantLinear] | None:
    """(body giving the final hidden states, frozen output Linear) when logits are exactly linear(hidden), else None.

    None for models that scale or cap their logits, or whose output layer trains or carries an adapter: their
    loss goes through the model's own forward.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    frozen = isinstance(head, QuantLinear) or (type(head) is nn.Linear and not head.weight.requires_grad)
    if not frozen or body is None or body is model:  # a QuantLinear is frozen: the loss dequantizes it per call
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _SCALED_LOGITS):
        return None
    return body, head


def causal_lm_loss(model: nn.Module, batch: dict, chunk: int = CHUNK) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of `batch`, as model(**batch).loss computes it.

    Uses the chunked output layer when the model allows (see `output_layer`), the model's own forward otherwise.
    """
    parts = output_layer(model)
    inputs, _ = virtual_inputs(model, batch)  # a prompt's positions come with IGNORE labels
    if parts is None or "labels" not in batch:
        return model(**inputs).loss
    body, head = parts
    labels = inputs["labels"]  # (B, T'), T' = n + T with a prompt, T otherwise
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T', H)
    targets = labels[:, 1:]  # token t predicts token t+1
    keep = targets != -100
    picked = hidden[:, :-1][keep]  # (N, H): only the positions that carry a label
    if picked.shape[0] == 0:
        raise ValueError("no labelled tokens in the batch: every label is -100 (were answers truncated away?)")
    weight = head.weight.dequantize() if isinstance(head, QuantLinear) else head.weight  # (V, H)
    return linear_cross_entropy(picked, weight, targets[keep], head.bias, chunk)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """mean_i CE(hidden_i @ weight.T + bias, targets_i) without building the (N, vocab) logits.

    hidden (N, H) may require grad; weight (V, H) and bias (V,) are frozen. Matrix products run in the inputs'
    dtype, softmax and the loss in fp32.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy: the output layer must be frozen (its gradient is not computed)")
    if hidden.requires_grad and torch.is_grad_enabled():
        return _LinearCrossEntropy.apply(hidden, weight, targets, bias, chunk)
    return _loss_and_grad(hidden, weight, targets, bias, chunk, want_grad=False)[0]


def _loss_and_grad(hidden, weight, targets, bias, chunk: int, want_grad: bool):
    """(mean loss, d mean loss / d hidden or None), one chunk of rows at a time.

    The chunk's logits live in two buffers made once per call and overwritten in place, instead of a fresh
    25 MB tensor per operation (measured on an AMX CPU over 1,024 tokens and SmolLM2's 49,152-token vocabulary:
    the loss and its gradient took 0.33 s that way, 0.23 s this way).
    """
    n, dtype = hidden.shape[0], compute_dtype(hidden)  # the products run in autocast's dtype when it is on
    w = weight.to(dtype)  # (V, H); no copy when it has that dtype already
    rows_max = min(chunk, n)
    product = torch.empty(rows_max, w.shape[0], dtype=dtype, device=hidden.device)  # (c, V) in the matmul dtype
    logits = product if dtype == torch.float32 else torch.empty_like(product, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty(n, hidden.shape[1], dtype=dtype, device=hidden.device) if want_grad else None
    for start in range(0, n, chunk):
        m, y = min(chunk, n - start), targets[start:start + chunk]
        out, z = product[:m], logits[:m]
        torch.mm(hidden[start:start + m].to(dtype), w.T, out=out)
        if bias is not None:
            out.add_(bias.to(dtype))
        if z is not out:
            z.copy_(out)  # softmax and the loss in fp32
        top = z.amax(dim=1, keepdim=True)  # (m, 1)
        picked = z.gather(1, y[:, None])  # (m, 1): the target's logit
        z.sub_(top).exp_()  # exp(z - max), in place
        norm = z.sum(dim=1, keepdim=True)  # (m, 1)
        total += (top + norm.log() - picked).sum()  # log-sum-exp minus the target's logit
        if want_grad:  # d CE / d logits = softmax - onehot; then back through the linear layer
            z.div_(norm)
            z[torch.arange(m, device=z.device), y] -= 1.0
            if z is not out:
                out.copy_(z)
            torch.mm(out, w, out=grad[start:start + m])
    if grad is not None:
        grad = grad.div_(n).to(hidden.dtype)
    return total / n, grad


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss's gradient is computed in forward, chunk by chunk, and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, chunk):
        loss, grad = _loss_and_grad(hidden.detach(), weight, targets, bias, chunk, want_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None
