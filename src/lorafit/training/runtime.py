"""The training runtime: precision, device and compiling; the fast path is a frozen bf16 base with fp32 LoRA weights
and optimizer, and a loss that skips the logits.

Where the time of a LoRA step goes on a CPU: the frozen weights need no gradient, so a step is about two forward
passes of matrix multiplies, which bf16 matrix units run several times faster than fp32.
What is left besides them is mostly the output layer, which `loss.linear_cross_entropy` computes without ever
building the logits, and small elementwise kernels, which compiled blocks fuse (`compile_model_blocks`).

`precision="fp32"` is the exact path: every tensor stays fp32 and the loss equals transformers' own to float
rounding (tests compare the two). `precision="bf16"` casts the frozen weights to bf16; the trainable weights
(LoRA A and B, a classifier head) and the optimizer stay fp32, and LoRA's branch computes in fp32.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from torch import nn

from ..core.anatomy import blocks_of
from .cpu import rowsplit

PRECISIONS = ("auto", "bf16", "fp32")
ACTIVATION_BUDGET = 0.7  # share of its activations a compiled block keeps for backward; it recomputes the rest
COMPILE_PAYS_AFTER = 330  # steps after which compiling paid for itself (measured: docs/performance.md)


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
    their activations for backward and recompute the cheapest rest (the compiler's activation memory budget):
    less peak memory at the same step time. Eager blocks ignore it.
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
    only place it was measured)."""
    return device.type == "cpu" and precision == "bf16" and steps >= COMPILE_PAYS_AFTER


def resolve_compile(requested: bool | str, steps: int, device: torch.device, precision: str,
                    quantized: bool) -> tuple[bool, str]:
    """(compile the blocks?, why) for train.compile: true and false as asked; "auto" compiles an unquantized model
    for a run where `compile_would_pay`, once a tiny function compiled and ran here (`compiler_problem`)."""
    if requested != "auto":
        return bool(requested), "as asked"
    if quantized or not compile_would_pay(steps, device, precision):
        return False, (f"auto: measured to pay only for {COMPILE_PAYS_AFTER}+ steps in bf16 on a CPU, "
                       "unquantized")
    problem = compiler_problem()
    if problem:
        return False, f"auto: torch.compile does not work here ({problem})"
    return True, f"auto: {steps} steps in bf16 on a CPU"


@functools.cache
def compiler_problem() -> str:
    """"" when torch.compile (inductor, which builds C++ on a CPU) compiles and runs a tiny function, else why not."""
    try:
        doubled = torch.compile(lambda x: x * 2.0 + 1.0, dynamic=False)(torch.ones(8))
    except Exception as error:  # a missing or broken C++ compiler shows up as any of several error types
        message = str(error).strip()
        return f"{type(error).__name__}: {message.splitlines()[0][:200]}" if message else type(error).__name__
    return "" if torch.equal(doubled, torch.full((8,), 3.0)) else "a compiled test function gave a wrong result"


def compile_model_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block in place (inductor); returns how many. State-dict keys do not change.

    On a CPU step most of the time outside the matrix products goes to small elementwise kernels (RMSNorm in
    fp32, rotary embeddings, SiLU times up-projection, dtype casts), each a pass over memory; inductor fuses them.
    One block's code serves all of them, compiled once with dynamic shapes (batches differ in length). The price
    is the first step: tens of seconds of compiling, so it pays on longer runs.

    On a CPU the code that calls each block's kernels is C++ too (inductor's `cpp_wrapper`): in Python it spent
    time per block call allocating and viewing buffers.
    """
    _, blocks = blocks_of(model)
    on_cpu = next(model.parameters()).device.type == "cpu"
    for block in blocks:
        block.compile(dynamic=True, options={"cpp_wrapper": True} if on_cpu else None)
    return len(blocks)
