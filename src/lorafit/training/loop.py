"""The training loop: a stream of batches, one optimizer step at a time, evaluation and checkpoints on schedule."""

from __future__ import annotations

import itertools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..core.faults import kill_point
from ..data import Example, batches
from ..inference.scoring import mean_loss
from ..methods import model_inputs
from ..methods.mezo import MeZO
from .checkpoint import save_checkpoint
from .config import RunConfig
from .distributed import Replicas
from .loss import causal_lm_loss
from .optim import lr_at, set_lr
from .report import MetricsLog
from .runtime import autocast, evaluation, training


def loss_of(model: nn.Module, batch: dict, chunked: bool = True) -> torch.Tensor:
    """The training loss of `batch`: the chunked next-token loss for language models (unless not `chunked`), the
    model's own otherwise.

    The batch goes to the model's device, with the method's virtual tokens put in (`methods.model_inputs`).
    """
    labels = batch.get("labels")
    inputs, _ = model_inputs(model, batch)
    if chunked and labels is not None and labels.dim() == 2 and labels.shape == batch["input_ids"].shape:
        return causal_lm_loss(model, inputs)
    return model(**inputs).loss


def micro_batches(examples: list[Example], batch_size: int, pad_id: int, seed: int, start: int) -> Iterator[dict]:
    """An endless, deterministic stream of shuffled batches, epoch after epoch, skipping the first `start`."""
    per_epoch = math.ceil(len(examples) / batch_size)
    first_epoch, skip = divmod(start, per_epoch)
    for epoch in itertools.count(first_epoch):
        yield from batches(examples, batch_size, pad_id, shuffle=True, seed=seed, epoch=epoch,
                           start=skip if epoch == first_epoch else 0)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, parts: list[dict], clip: float,
               precision: str = "fp32", replicas: Replicas | None = None) -> tuple:
    """One optimizer step over `parts` (gradient accumulation; with several processes, each part is the global
    micro-batch and `replicas` takes this rank's shard); returns (mean loss, tokens seen) of the global batch."""
    replicas = replicas or Replicas(model, loss_of)
    model.train()
    tokens = sum(int(batch["attention_mask"].sum()) for batch in parts)
    if isinstance(optimizer, MeZO):  # two forward passes over all parts, no backward
        model.eval()  # both passes must see the same function: no dropout noise in the difference

        def closure() -> torch.Tensor:
            with autocast(precision, model):
                local = sum(replicas.loss(batch) for batch in parts) / len(parts)
            return torch.tensor(replicas.mean(local), dtype=torch.float64)
        return optimizer.step(closure).item(), tokens
    losses = []  # this rank's weighted loss of each part, on the model's device
    for i, batch in enumerate(parts):
        with replicas.sync(i == len(parts) - 1):  # DDP/FSDP reduce gradients on the last micro-batch only
            with training(precision, model):
                loss = replicas.loss(batch) / len(parts)
            loss.backward()
        losses.append(loss.detach().double())
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    replicas.steps += 1
    return replicas.mean(torch.stack(losses).sum()), tokens


class _StopOnSigint:
    """Turn the first Ctrl-C into a request to stop at the next step boundary (a second one interrupts at once).

    A second SIGINT within `ECHO` seconds of the first counts as the same Ctrl-C: under torchrun a terminal's Ctrl-C
    reaches each process twice, from the terminal and forwarded by torchrun. Only in the main thread, where Python
    delivers signals; a loop run from another thread leaves them alone.
    """

    ECHO = 2.0

    def __enter__(self):
        self.requested, self.first = False, 0.0
        main = threading.current_thread() is threading.main_thread()
        self.previous = signal.signal(signal.SIGINT, self._handle) if main else None
        return self

    def _handle(self, signum, frame):
        if self.requested and time.monotonic() - self.first > self.ECHO:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.first = True, time.monotonic()

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run_loop(model: nn.Module, optimizer: torch.optim.Optimizer, train_set: list[Example], val_set: list[Example],
             cfg: RunConfig, state: dict, pad_id: int, log: Callable[[str], None],
             fingerprint: dict | None = None, replicas: Replicas | None = None) -> dict:
    """Steps from state['step'] to cfg.train.steps, logging, evaluating and checkpointing on schedule.

    Ctrl-C finishes the current step, writes a checkpoint and ends the run; `--resume` continues from it. Each step
    is saved at most once: the final checkpoint is skipped when the last step was just saved (or resumed from).
    `fingerprint` goes into every checkpoint (`training.fingerprint`). With several processes (`replicas`), each
    runs this loop on its shard of every batch; rank 0 alone writes metrics, checkpoints and the progress bar.
    """
    t, out = cfg.train, Path(cfg.out)
    replicas = replicas or Replicas(model, loss_of)
    main = replicas.world.main
    stream = micro_batches(train_set, t.batch_size, pad_id, t.seed, state["micro_batches"])
    metrics = MetricsLog(out / "metrics.jsonl" if main else None, tensorboard=t.tensorboard, start_step=state["step"])
    bar = tqdm(total=t.steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True, disable=not main)
    saved = state["step"] if state["step"] > 0 else None  # a resumed run starts from a saved step

    def save() -> Path:
        nonlocal saved
        saved = state["step"]
        return save_checkpoint(out / "checkpoints", model, optimizer, state, fingerprint=fingerprint,
                               world=replicas.world)

    with _StopOnSigint() as sigint, metrics, bar:
        while state["step"] < t.steps:
            step, started = state["step"], time.perf_counter()
            lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
            set_lr(optimizer, lr)
            torch.manual_seed(step_seed(t.seed, step, replicas.world.rank))  # dropout: fixed by (seed, step, rank)
            loss, tokens = train_step(model, optimizer, [next(stream) for _ in range(t.grad_accum)], t.clip,
                                      t.precision, replicas)
            seconds = time.perf_counter() - started
            state = {"step": step + 1, "micro_batches": state["micro_batches"] + t.grad_accum,
                     "seconds": state["seconds"] + seconds}
            row = {"step": step + 1, "loss": round(loss, 7), "lr": lr, "tokens_per_s": round(tokens / seconds, 1)}
            if (t.eval_every and (step + 1) % t.eval_every == 0) or step + 1 == t.steps:
                with evaluation(t.precision, model):
                    eval_loss = mean_loss(model, val_set, cfg.eval.batch_size, pad_id, replicas.eval_loss)
                row.update(eval_loss=round(eval_loss, 7), eval_rows=len(val_set))  # the rows the final table scores
            metrics.write(row, log if (step + 1) % t.log_every == 0 or "eval_loss" in row else None)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            kill_point("step", step + 1)
            if replicas.any_rank(sigint.requested):  # every process stops at the same step
                log(f"interrupted at step {state['step']}: checkpoint saved to {save()}; continue with --resume")
                raise SystemExit(130)
            if t.save_every and (step + 1) % t.save_every == 0:
                save()
    if saved != state["step"]:
        save()
    return state


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of optimizer step `step` on process `rank`: dropout masks depend on nothing else, so a resumed
    run draws the masks the uninterrupted one did, and each rank draws its own."""
    return (seed * 1_000_003 + step) * 1_009 + rank

