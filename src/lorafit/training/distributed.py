"""Data-parallel training on PyTorch's own distributed engine: `torchrun` processes, DDP or FSDP2, exact.

`torchrun --nproc-per-node N -m lorafit train ...` starts N processes; each finds its rank in the environment and
`start` joins them into one process group (gloo on the CPU, nccl on CUDA). From there every process runs the same
recipe. `Replicas` is all the training loop sees of it:

- Each global batch (`train.batch_size` rows, the same stream as one process reads) is cut into N disjoint,
  contiguous row shards, one per rank (`shard`). Each rank weighs its shard's mean loss by its share of the
  batch's loss terms (labelled tokens, or rows), so that the averaged gradients are exactly the one-process
  gradient of the whole batch, whatever the shards' sizes.
- DDP wraps the step's loss (`StepLoss`), not the model, so the chunked output-layer loss runs under DDP too.
  Only trainable parameters are in its buckets; frozen weights are neither broadcast nor reduced. A comm hook
  counts the bytes each step all-reduces.
- FSDP2 (`fully_shard`) shards each transformer block and the rest of the model; the loss goes through the
  model's own forward (FSDP2 gathers weights in the root module's hooks, which the chunked loss would bypass).
- Checkpoints gather the trainable state (`full_state`), LoRA-sized, so rank 0 writes the one-process format
  and a run resumes on any number of processes (`load_full_state`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..core.anatomy import blocks_of
from ..core.surgery import trainable_parameters

PARALLEL = ("ddp", "fsdp")
_owned = False  # whether `start` made the process group (and `stop` may destroy it)
LOSS_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank among `size` processes (1: not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> World:
    """The World torchrun's environment describes (RANK, WORLD_SIZE, LOCAL_RANK); one process when it is unset."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def launch_local(nproc: int, args: list[str], debug: bool = False) -> int:
    """Run `lorafit ARGS` in `nproc` processes on this machine under torchrun (`--standalone`: a free port of its
    own); returns torchrun's exit code. Each process gets an equal share of the cores as its torch threads."""
    if "WORLD_SIZE" in os.environ:
        raise ValueError("--nproc: this process was started by torchrun already; drop --nproc (torchrun's "
                         "--nproc-per-node sets the number of processes)")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lorafit", *(["--debug"] if debug else []), *args]
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def start(device: torch.device, timeout_s: float) -> World:
    """Join the process group torchrun set up (gloo on the CPU, nccl on CUDA); a no-op for one process, or when
    the caller made a group already.

    `timeout_s` bounds every collective: a rank that died or hangs makes the others fail with an error instead of
    waiting for ever.
    """
    global _owned
    world = launched()
    if world.size == 1 or dist.is_initialized():  # one process, or a group the caller made (left to the caller)
        return world
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _owned = True
    return world


class PeerLost(ConnectionError):
    """Another process of the run died or stalled: a collective failed or timed out."""


def peer_failure(err: BaseException) -> str | None:
    """What a failed collective means to the user (None for any other error): torch raises DistError subclasses,
    or a RuntimeError naming the backend, when a peer closed its connection or a collective timed out."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, dist.DistError) or any(word in str(err) for word in ("gloo", "Gloo", "NCCL", "Connection")):
        return (f"another process of this run died or stopped answering ({text[:200]}); its own output says why. "
                "The last checkpoint is intact: fix the cause and continue with --resume")
    return None


def stop() -> None:
    """Leave the process group `start` joined (at the end of a run, or when it failed); a group the caller made
    stays."""
    global _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def broadcast(value, world: World):
    """Rank 0's `value` (any picklable object of ours: a path, a step number), on every rank."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def loss_terms(batch: dict) -> int:
    """How many terms the model's mean loss averages over: labelled next-token positions, or rows."""
    labels = batch["labels"]
    if labels.dim() == 2 and labels.shape == batch["input_ids"].shape:
        return int((labels[:, 1:] != -100).sum())
    return labels.shape[0]


def shard(batch: dict, world: World) -> tuple[dict, float]:
    """(this rank's rows of `batch`, the weight of their mean loss), with Σ_ranks weight · mean = world · batch mean.

    Rows are cut in `world.size` contiguous shards (sizes differ by at most one); trailing columns that are padding
    in every row of the shard are dropped (right padding: nothing attends to them). A rank whose shard is empty,
    or has no labelled token, takes the batch's first row with weight 0: it runs forward and backward like the
    others (every rank must join each all-reduce) and adds nothing.
    """
    if world.size == 1:
        return batch, 1.0
    rows = batch["input_ids"].shape[0]
    bounds = [rows * r // world.size for r in range(world.size + 1)]
    part = {key: value[bounds[world.rank]:bounds[world.rank + 1]] for key, value in batch.items()}
    total = loss_terms(batch)
    mine = loss_terms(part) if part["input_ids"].shape[0] else 0
    if mine == 0:
        return {key: value[:1] for key, value in batch.items()}, 0.0
    if set(part) <= set(LOSS_KEYS):
        width = int(part["attention_mask"].sum(dim=0).nonzero().max()) + 1
        width = min(-(-width // 16) * 16, part["input_ids"].shape[1])  # the batch's padding multiple
        part = {key: value[:, :width] if value.dim() == 2 else value for key, value in part.items()}
    return part, world.size * mine / total


class StepLoss(nn.Module):
    """The training loss of a batch as a module: DDP wraps this, so its forward covers the whole loss."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor], chunked: bool = True):
        super().__init__()
        self.model, self.loss, self.chunked = model, loss, chunked

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss(self.model, batch, chunked=self.chunked)


class Replicas:
    """The model as the training step uses it on `world`: sharded losses, gradient sync, gathered state.

    With one process every method is a plain pass-through, so the one-process loop is the same code.
    """

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor], world: World = World(),
                 parallel: str = "ddp", precision: str = "fp32", gradients: bool = True):
        """`loss(model, batch, chunked=...)` is the training loss (`loop.loss_of`); `gradients` False for MeZO."""
        self.model, self.world, self.parallel = model, world, parallel
        self.reduced_bytes = 0  # gradient bytes all-reduced (DDP) so far
        self.steps = 0
        self._forward: nn.Module = StepLoss(model, loss)
        sharded = world.size > 1 and parallel == "fsdp"  # FSDP2 gathers weights in the model's own forward only
        self.eval_loss = functools.partial(loss, chunked=not sharded)
        if world.size == 1 or not gradients:  # MeZO: forward passes only; its losses are reduced in `mean`
            return
        if parallel == "fsdp":
            shard_model(model, precision)
            self._forward = StepLoss(model, loss, chunked=False)
        else:
            self._forward = _ddp(self._forward, model, self)

    def loss(self, batch: dict) -> torch.Tensor:
        """This rank's weighted loss on its shard of `batch` (the whole batch's mean loss with one process)."""
        part, weight = shard(batch, self.world)
        return self._forward(part) * weight

    def mean(self, local: torch.Tensor) -> float:
        """The global batch's loss from each rank's weighted loss: their sum over ranks / world size."""
        if self.world.size == 1:
            return local.item()
        total = local.detach().double().clone()
        dist.all_reduce(total)
        return (total / self.world.size).item()

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a Ctrl-C that one of them got, say)."""
        if self.world.size == 1:
            return flag
        box = torch.tensor([int(flag)], device=next(self.model.parameters()).device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return bool(box.item())

    def sync(self, on: bool):
        """A context for one micro-batch's forward and backward: gradients are reduced only when `on` (the last
        micro-batch of an optimizer step; the others accumulate locally, `no_sync`)."""
        if self.world.size == 1 or on:
            return contextlib.nullcontext()
        if self.parallel == "fsdp":
            return _fsdp_no_sync(self.model)
        return self._forward.no_sync()

    def gather(self) -> None:
        """After training under FSDP2: whole weights on every process from here on (each block all-gathered once
        and kept), so the final evaluation and the adapter save work on plain tensors. Nothing to do otherwise."""
        if self.world.size == 1 or self.parallel != "fsdp":
            return
        from torch.distributed.fsdp import FSDPModule  # FSDP2: only for parallel: fsdp

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.set_reshard_after_forward(False)
                module.unshard()
        self.eval_loss = functools.partial(self.eval_loss.func, chunked=True)

    def communication(self) -> dict:
        """What the run sent between processes per optimizer step, for results.json: DDP's all-reduced gradient
        bytes as its comm hook counted them; FSDP2's all-gathers and reduce-scatters counted from the parameter
        sizes (`fsdp_bytes`)."""
        if self.world.size == 1:
            return {"world_size": 1, "bytes_per_step": 0}
        if self.parallel == "fsdp":
            return {"world_size": self.world.size, "parallel": "fsdp", "bytes_per_step": fsdp_bytes(self.model),
                    "counted": "from parameter sizes: weights gathered twice, trainable gradients reduced once"}
        return {"world_size": self.world.size, "parallel": "ddp", "allreduce_bytes_per_step":
                self.reduced_bytes // max(self.steps, 1), "bytes_per_step": self.reduced_bytes // max(self.steps, 1),
                "counted": "DDP comm hook: gradient buckets all-reduced"}


def _ddp(step_loss: StepLoss, model: nn.Module, replicas: Replicas) -> nn.Module:
    """DDP over `step_loss` with only trainable parameters in play; its comm hook counts the reduced bytes."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # DDP's own default
    from torch.nn.parallel import DistributedDataParallel  # only a distributed run needs it

    trained = {name for name, _ in trainable_parameters(model)}
    frozen = [f"model.{name}" for name, p in model.named_parameters() if name not in trained]
    frozen += [f"model.{name}" for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_loss, frozen)  # every rank loaded them
    device = next(model.parameters()).device
    wrapped = DistributedDataParallel(step_loss, device_ids=[device] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)

    def counted(group, bucket):
        replicas.reduced_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(group, bucket)

    wrapped.register_comm_hook(None, counted)
    return wrapped


def shard_model(model: nn.Module, precision: str) -> None:
    """FSDP2 over `model`: one group per transformer block, one for the rest; in bf16, weights are gathered in
    bf16 and gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # FSDP2: only for parallel: fsdp

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    _, blocks = blocks_of(model)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def fsdp_bytes(model: nn.Module) -> int:
    """Bytes FSDP2 moves per optimizer step: every weight all-gathered for forward and again for backward, and
    the trainable gradients reduce-scattered (each counted once at its full size)."""
    gathered = sum(p.numel() * p.element_size() for p in model.parameters())
    reduced = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return 2 * gathered + reduced


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(trainable weights, optimizer state dict) as full CPU tensors: FSDP2's shards gathered (every rank must
    call this); DDP's replicas are already whole."""
    weights = {name: _full(p.detach()).cpu().contiguous() for name, p in trainable_parameters(model)}
    state = optimizer.state_dict()
    state["state"] = {index: {key: _full(value) for key, value in entry.items()}
                      for index, entry in state["state"].items()}
    return weights, state


def _full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    state: dict) -> None:
    """Put full (gathered) trainable weights and optimizer state into `model` and `optimizer`, sharding them
    where the model is sharded."""
    params = dict(trainable_parameters(model))
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(_like(params[name], tensor))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]

    def placed(index, entry: dict) -> dict:  # index: a parameter's position (MeZO keeps one entry of its own)
        if not isinstance(index, int):
            return entry
        return {key: _like(ordered[index], value) if torch.is_tensor(value) and value.dim() else value
                for key, value in entry.items()}
    optimizer.load_state_dict({**state, "state": {index: placed(index, entry)
                                                  for index, entry in state["state"].items()}})


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` placed like `param`: this rank's shard of it when `param` is an FSDP2 DTensor."""
    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)
