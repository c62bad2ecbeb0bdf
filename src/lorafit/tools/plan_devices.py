"""`lorafit plan --devices N`: the training-memory accounting per device when N processes train data-parallel.

lorafit trains under torchrun in one of two ways (training.distributed): DDP, where every process holds the whole
model and only the gradients are all-reduced, or FSDP2, where weights, gradients and optimizer states are sharded
1/N and a transformer block's full weights are all-gathered for its forward and backward, then freed. In both,
`train.batch_size` is the global batch, cut into N row shards, so a device's activations are those of its shard.

This module turns the one-device table (`plan.memory_table`) into per-device rows for both ways, with the bytes
each sends per optimizer step. It takes plain numbers and the meta model; `plan.plan` calls it, so that the
one-device accounting stays the single source of the bytes per parameter.
"""

from __future__ import annotations

import math

from torch import nn

from ..core.adapter_io import PREFIX
from ..core.anatomy import blocks_of
from ..core.lora import LoraLinear
from ..core.surgery import module_kind

PARALLEL = {"ddp": "DDP", "fsdp": "FSDP"}
PARTS = ("weights", "grads", "optimizer", "activations", "working")


def _block_counts(path: str, block: nn.Module, planned: dict[str, tuple[int, ...]]) -> dict:
    """Frozen base params, LoRA params and quantizable weight sizes of one block (the model holds LoRA already).

    LoRA params are the block's trainable ones plus the planned fused-slice updates under its path (`planned`
    holds adapter keys, `PREFIX` + module path). The quantizable weights are those of the Linear/Conv1D modules,
    wrapped by LoRA or not: the ones QLoRA stores in NF4.
    """
    lora = sum(p.numel() for p in block.parameters() if p.requires_grad)
    lora += sum(math.prod(shape) for key, shape in planned.items() if key.startswith(f"{PREFIX}{path}."))
    base = sum(p.numel() for p in block.parameters() if not p.requires_grad)
    quant = [m.weight.numel() for m in block.modules()
             if isinstance(m, LoraLinear) or module_kind(m) in ("linear", "conv1d")]
    return {"path": path, "params": base, "lora": lora, "quantized": quant}


def largest_block(model: nn.Module, planned: dict[str, tuple[int, ...]]) -> dict:
    """The transformer block with the most parameters (LoRA included), which sizes FSDP's gathered buffer.

    Blocks are the model's list of decoder (or encoder) layers, as FSDP2 wraps them in lorafit's trainer
    (`blocks_of`); raises AnatomyError for a model without one. The result also holds the number of blocks and
    the params outside them (embeddings, final norm, head), which FSDP2 shards as the root group.
    """
    path, blocks = blocks_of(model)
    counts = [_block_counts(f"{path}.{i}", block, planned) for i, block in enumerate(blocks)]
    outside = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in blocks.parameters())
    return {**max(counts, key=lambda c: c["params"] + c["lora"]), "count": len(blocks), "outside_params": outside}


def rows(k: int) -> str:
    """"1 row", "8 rows": a count of batch rows in a sentence."""
    return f"{k} row" if k == 1 else f"{k} rows"


def _row(weights: float, grads: float, optimizer: float, activations: float, working: float, sent: dict) -> dict:
    total = weights + grads + optimizer + activations + working
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations,
            "working": working, "total": total, **sent, "comm_bytes": sum(sent.values())}


def per_device(n: int, one: dict[str, dict], mine: dict[str, dict], gathered: dict[str, dict]) -> dict:
    """{method: {"ddp": row, "fsdp": row}}: each device's bytes on `n` devices, and what it sends per step.

    `one` is the one-device table (whole batch), `mine` the same table for one device's rows of the batch (its
    activations are the device's), `gathered` the table for the largest block alone (its "weights": the block's
    full weights in each method's format). DDP keeps everything whole and all-reduces the gradients (the table's
    gradient bytes: only LoRA's for LoRA and QLoRA). FSDP divides weights, grads and optimizer states by `n`;
    its working buffer is the gathered block twice (one computing, the next prefetched); it all-gathers every
    weight twice (forward, backward) and reduce-scatters the gradients once.
    """
    table = {}
    for method, row in one.items():
        act, block = mine[method]["activations"], gathered[method]["weights"]
        table[method] = {
            "ddp": _row(row["weights"], row["grads"], row["optimizer"], act, 0, {"allreduce_bytes": row["grads"]}),
            "fsdp": _row(row["weights"] / n, row["grads"] / n, row["optimizer"] / n, act, 2 * block,
                         {"allgather_bytes": 2 * row["weights"], "reduce_scatter_bytes": row["grads"]}),
        }
    return table


def device_plan(n: int, batch_size: int, activations: dict, block: dict, one: dict, mine: dict,
                gathered: dict) -> dict:
    """The result's "devices" entry: the setting, the largest block, each device's activations and the rows."""
    return {"count": n, "batch_size": batch_size, "rows_per_device": math.ceil(batch_size / n),
            "activations": activations,
            "block": {**block, "weights_bytes": {k: v["weights"] for k, v in gathered.items()}},
            "memory": per_device(n, one, mine, gathered)}


def device_notes(dev: dict) -> list[str]:
    """What the per-device rows stand for where lorafit's own trainer differs or the batch is small."""
    notes = ["QLoRA with FSDP: lorafit's trainer refuses train.parallel: fsdp with a quantized base (it trains "
             "QLoRA with DDP); the QLoRA FSDP row is the accounting of what a sharded NF4 base would need."]
    n, b = dev["count"], dev["batch_size"]
    if b < n:
        notes.append(f"The batch of {rows(b)} is smaller than {n} devices: {n - b} of them get no rows of their own; "
                     "lorafit's trainer gives each of those the batch's first row with weight 0 (every device must "
                     "join each collective), so each holds one row's activations, as counted here.")
    return notes


def device_assumptions(dev: dict) -> list[str]:
    """The per-device accounting spelled out, for the assumptions list."""
    n, block = dev["count"], dev["block"]
    act = dev["activations"]
    return [
        f"Per device on {n} devices: the global batch of {rows(dev['batch_size'])} is cut into {n} row shards; each "
        f"device's activations are the formula above for ceil({dev['batch_size']}/{n}) = "
        f"{rows(dev['rows_per_device'])} ({act['bytes']:,} bytes in 16 bits; full fp32 twice that).",
        "DDP: every device holds the whole model: weights, grads and optimizer states as in the one-device table, "
        "plus its own activations; no working buffer. Sent per step: the gradients all-reduced at the table's "
        "gradient size: fp32 grads of all params (4 bytes/param) for full fp32, 16-bit grads of all params (2 "
        "bytes/param) for mixed precision, fp32 grads of the LoRA params alone for LoRA and QLoRA (frozen weights "
        "are neither broadcast nor reduced).",
        f"FSDP (fully_shard per block and the root): weights, grads and optimizer states are the one-device "
        f"figures / {n} (FSDP2's padding of each tensor to a multiple of {n} rows left out). Working buffer: the "
        f"full weights of the largest block ({block['path']}, {block['params'] + block['lora']:,} params with LoRA's, "
        f"1 of {block['count']}) in the method's weight format, twice: one block computing while the next is "
        "prefetched. Sent per step: every weight all-gathered twice (forward, and again for backward) plus the "
        "trainable gradients reduce-scattered once, at the table's gradient size.",
        f"Bytes sent are the sizes of the tensors reduced or gathered, as lorafit's trainer reports them; a ring "
        f"all-reduce moves about 2({n}-1)/{n} of that per device, an all-gather or reduce-scatter ({n}-1)/{n}. Not "
        f"counted: the weights outside the blocks (embeddings, final norm, head: {block['outside_params']:,} params), "
        "which FSDP2 keeps gathered from forward through backward as the root group; a block's full gradients "
        "before their reduce-scatter; communication buffers.",
    ]
