"""The training loss of a language model without its logits: next-token cross-entropy, chunked.

After the matrix products of the blocks, most of a CPU step used to go to the output layer: a (tokens x vocab)
logits tensor in fp32, its log-softmax and its gradient, hundreds of MB written and read back on every step.
`linear_cross_entropy` never builds it. It computes the logits a block of rows at a time, turns them into the
loss and into the gradient with respect to the hidden states at once (the gradient is kept for backward), and
reuses its scratch memory from one call to the next. Prompt tokens whose label is masked (-100) are dropped
before the output layer, so an instruction-tuning step pays only for the answer tokens.

No maintained library does this on CPU: the fused linear-cross-entropy kernels that exist (Liger, Apple's
cut-cross-entropy) are Triton kernels for GPUs.

The block sizes below were chosen by timing each part on a CPU (docs/performance.md has the figures): logits
products run faster in large blocks, gradient products (a long inner dimension) in medium ones. For bf16 logits
with a gradient to compute, softmax is one kernel writing bf16 probabilities (`_probabilities_pass`). In fp32, or
without a gradient (evaluation), softmax goes `CHUNK` rows at a time through an fp32 buffer.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..core.packed import PackedLinear, compute_dtype

CHUNK = 128  # rows per fp32 softmax pass: 128 x 49,152 fp32 is 24 MiB
PRODUCT_BYTES = 48 << 20  # logits per product block: 512 rows of a 49,152-token vocabulary in bf16, 256 in fp32
GRADIENT_ROWS = 256  # rows per gradient product (and per bf16 softmax)
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_local = threading.local()  # scratch buffers kept between calls, one set per thread (see `_scratch`)


def output_layer(model: nn.Module) -> tuple[nn.Module, nn.Linear | PackedLinear] | None:
    """(body giving the final hidden states, frozen output Linear) when logits are exactly linear(hidden), else None.

    None for models that scale or cap their logits, or whose output layer trains or carries an adapter: their
    loss goes through the model's own forward.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    frozen = isinstance(head, PackedLinear) or (type(head) is nn.Linear and not head.weight.requires_grad)
    if not frozen or body is None or body is model:  # a PackedLinear is frozen: the loss dequantizes it per call
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _SCALED_LOGITS):
        return None
    return body, head


def causal_lm_loss(model: nn.Module, inputs: dict, chunk: int = CHUNK) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of `inputs`, as model(**inputs).loss computes it.

    `inputs` are the model's keyword arguments, on its device (lorafit.methods.model_inputs: virtual positions
    carry IGNORE labels). Uses the chunked output layer when the model allows (see `output_layer`), the model's own
    forward otherwise.
    """
    parts = output_layer(model)
    if parts is None or "labels" not in inputs:
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
    weight = head.weight.dequantize() if isinstance(head, PackedLinear) else head.weight  # (V, H)
    return linear_cross_entropy(picked, weight, targets[keep], head.bias, chunk)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """mean_i CE(hidden_i @ weight.T + bias, targets_i) without building the (N, vocab) logits.

    hidden (N, H) may require grad; weight (V, H) and bias (V,) are frozen. Matrix products run in the inputs'
    dtype (autocast's when it is on), softmax and the loss in fp32 (`chunk` rows at a time), except that with a
    gradient to compute, low-precision logits get their softmax written in their own dtype (see the module doc).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy: the output layer must be frozen (its gradient is not computed)")
    if hidden.requires_grad and torch.is_grad_enabled():
        return _LinearCrossEntropy.apply(hidden, weight, targets, bias, chunk)
    return _loss_and_grad(hidden, weight, targets, bias, chunk, want_grad=False)[0]


def _loss_and_grad(hidden, weight, targets, bias, chunk: int, want_grad: bool):
    """(mean loss, d mean loss / d hidden or None), one block of rows at a time (see the module doc)."""
    n, dtype, device = hidden.shape[0], compute_dtype(hidden), hidden.device
    w = weight.to(dtype)  # (V, H); no copy when it has that dtype already
    vocab = w.shape[0]
    block_rows = min(n, max(1, PRODUCT_BYTES // (vocab * w.element_size())))
    product = _scratch("product", block_rows, vocab, dtype, device)  # a block's logits, then their gradient
    low_precision = want_grad and dtype != torch.float32  # see `_probabilities_pass`
    probs = _scratch("probs", min(GRADIENT_ROWS, n), vocab, dtype, device) if low_precision else None
    fp32_copy = dtype != torch.float32 and not low_precision  # `_softmax_pass` works in an fp32 copy
    logits = _scratch("logits", min(chunk, n), vocab, torch.float32, device) if fp32_copy else None
    total = torch.zeros((), dtype=torch.float32, device=device)
    grad = torch.empty(n, hidden.shape[1], dtype=dtype, device=device) if want_grad else None
    for start in range(0, n, block_rows):
        rows = slice(start, min(start + block_rows, n))
        block = product[: rows.stop - start]
        torch.mm(hidden[rows].to(dtype), w.T, out=block)
        if bias is not None:
            block.add_(bias.to(dtype))
        if low_precision:
            total += _probabilities_pass(block, probs, targets[rows], w, grad[rows])
            continue
        for first in range(0, block.shape[0], chunk):
            part = block[first:first + chunk]
            m = part.shape[0]
            fp32 = part if logits is None else logits[:m]
            total += _softmax_pass(part, fp32, targets[start + first:start + first + m], want_grad)
        if want_grad:
            for first in range(0, block.shape[0], GRADIENT_ROWS):
                part = block[first:first + GRADIENT_ROWS]
                torch.mm(part, w, out=grad[start + first:start + first + part.shape[0]])
    if grad is not None:
        grad = grad.div_(n).to(hidden.dtype)
    return total / n, grad


def _softmax_pass(part: torch.Tensor, z: torch.Tensor, targets: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """The summed cross-entropy of the logits in `part` (m, V) against `targets` (m,), computed in fp32 in `z`
    (`part` itself when it is fp32). With `want_grad`, `part` is overwritten with d CE / d logits = softmax - onehot.
    """
    if z is not part:
        z.copy_(part)
    top = z.amax(dim=1, keepdim=True)  # (m, 1)
    picked = z.gather(1, targets[:, None])  # (m, 1): the target's logit
    z.sub_(top).exp_()  # exp(z - max), in place
    norm = z.sum(dim=1, keepdim=True)  # (m, 1)
    loss = (top + norm.log() - picked).sum()  # log-sum-exp minus the target's logit
    if want_grad:
        z.div_(norm)
        z[torch.arange(z.shape[0], device=z.device), targets] -= 1.0
        if z is not part:
            part.copy_(z)
    return loss


def _probabilities_pass(block: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor, w: torch.Tensor,
                        grad: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of a block of low-precision logits (m, V), with d CE / d hidden written to `grad`.

    Softmax runs as one kernel that reads the bf16 logits, computes in fp32 and writes bf16 probabilities, the
    dtype the gradient product takes anyway: faster than fp32 passes over a copy (the loss without a gradient),
    and no fp32 buffer. Each target's loss is -log of its bf16 probability: within 2^-8 of the fp32 value per
    token, less than the bf16 logit it comes from may be off by. A probability that underflows to zero takes its
    log from the logits instead.
    """
    total = torch.zeros((), dtype=torch.float32, device=block.device)
    for first in range(0, block.shape[0], GRADIENT_ROWS):
        part = block[first:first + GRADIENT_ROWS]
        m, picked = part.shape[0], targets[first:first + GRADIENT_ROWS]
        p = torch.softmax(part, dim=1, out=probs[:m])
        rows = torch.arange(m, device=block.device)
        log_p = p[rows, picked].float().log()  # (m,)
        lost = log_p == float("-inf")
        if lost.any():
            log_p[lost] = part[lost].float().log_softmax(dim=1).gather(1, picked[lost, None])[:, 0]
        total -= log_p.sum()
        p[rows, picked] -= 1.0  # softmax - onehot
        torch.mm(p, w, out=grad[first:first + m])
    return total


def _scratch(name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) buffer kept from one call to the next and grown when a call needs more.

    Made afresh on every call, the large logits block sits above glibc's mmap threshold: it goes back to the
    system when freed and is faulted in again page by page on the next step. Each thread keeps its own set, so
    two threads computing this loss at once never share a buffer; `release_scratch` frees the calling thread's.
    """
    kept = _local.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buffer = kept.get(key)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = kept[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buffer[: rows * cols].view(rows, cols)


def release_scratch() -> None:
    """Free the calling thread's scratch buffers (the end of a run); the next loss call makes them anew."""
    _local.__dict__.pop("buffers", None)


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss's gradient is computed in forward, block by block, and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, chunk):
        loss, grad = _loss_and_grad(hidden.detach(), weight, targets, bias, chunk, want_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None
