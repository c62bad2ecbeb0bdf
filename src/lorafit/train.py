"""`lorafit train`: load, inject, data, optimizer, loop of train_step / evaluate / save_checkpoint, report.

Read `train` top to bottom: it is the whole recipe. The loop runs on plain PyTorch; the only transformers
objects are the model and its tokenizer.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import lorafit

from . import methods, rowsplit
from .adapter_io import LABELS_FILE
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import Example, batches, encode, label_set, load_splits
from .evaluate import mean_loss, score
from .fast import (
    autocast,
    dtype_for,
    evaluation,
    prepare,
    resolve_compile,
    resolve_device,
    resolve_precision,
    training,
)
from .files import write_json
from .loss import loss_of
from .memory import PeakWindow, keep_freed_memory
from .methods.incontext import in_context_score
from .methods.mezo import MeZO
from .models import load_model
from .optim import lr_at, make_optimizer, set_lr, trainable_parameters
from .quant import model_bytes, quantized_weights
from .report import MetricsLog, plot_before_after, plot_loss
from .runconfig import RunConfig


def train(cfg: RunConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the whole job `cfg` describes; returns (and writes to out/results.json) the before/after report."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    train_rows, val_rows, fmt = load_splits(cfg.data, seed=cfg.train.seed, log=log)
    labels = label_set(train_rows, val_rows) if cfg.model.task == "classification" else None
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    compiled, why = resolve_compile(cfg.train.compile, cfg.train.steps, device, precision, cfg.model.quantize != "none")
    cfg = replace(cfg, train=replace(cfg.train, precision=precision, compile=compiled))  # from here on: resolved
    model, tokenizer = _load_model(cfg, labels, device, log)
    log(f"compile: {'on' if compiled else 'off'} ({why})")
    train_set = encode(train_rows, fmt, tokenizer, cfg.data, labels)
    val_set = encode(val_rows, fmt, tokenizer, cfg.data, labels)
    eval_rows, eval_set = val_rows[:cfg.eval.limit], val_set[:cfg.eval.limit]
    metric = pick_metric(cfg, fmt)

    def evaluate() -> dict:
        with evaluation(precision, model):
            return score(model, tokenizer, metric, eval_rows, eval_set, fmt, cfg.eval.batch_size,
                         cfg.eval.max_new_tokens, log)

    report = {"model": cfg.model.name, "method": cfg.method.name, "device": str(device), "precision": precision,
              "format": fmt, "quantize": cfg.model.quantize, "quantize_embeddings": cfg.model.quantize_embeddings,
              "compile": cfg.train.compile, "model_bytes": model_bytes(model),
              "metric": metric, "labels": labels, "train_rows": len(train_rows), "val_rows": len(eval_rows)}
    if cfg.eval.compare_base and not resume:
        log("scoring the base model ...")
        with PeakWindow() as peak:
            report["base"] = evaluate()
        report["peak_rss_mb_inference"] = peak.mb
    if cfg.method.name == "in-context":  # no training: the frozen model with k examples in every prompt
        report["tuned"] = in_context_score(model, tokenizer, eval_rows, train_rows, fmt, cfg.method.shots,
                                           cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.train.seed, log)
        write_json(out / "results.json", report)
        return report

    optimizer = _set_up_training(cfg, model, train_set, report, log)
    state = _resume(out, model, optimizer, log) if resume else {"step": 0, "micro_batches": 0, "seconds": 0.0}
    kept = keep_freed_memory()  # each step reuses what the last one freed instead of page-faulting it in again
    report["allocator"] = "glibc, freed memory kept for reuse" if kept else "the C library's default"
    with PeakWindow() as peak:
        state = run_loop(model, optimizer, train_set, val_set, cfg, state, tokenizer.pad_token_id, log)
    info = _save_result(cfg, model, labels, log)
    report.update(steps=state["step"], train_seconds=round(state["seconds"], 1), adapter=info,
                  trainable=lorafit.trainable_report(model), peak_rss_mb_train=peak.mb, peak_gpu_mb_train=peak.gpu_mb,
                  trainable_params=sum(p.numel() for _, p in trainable_parameters(model)))
    with PeakWindow() as peak:
        report["tuned"] = evaluate()
    report["peak_rss_mb_eval"] = peak.mb
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    plot_before_after(report, out / "before_after.png")
    write_json(out / "results.json", report)
    return report


def _load_model(cfg: RunConfig, labels: list[str] | None, device: torch.device, log: Callable[[str], None]):
    """(model, tokenizer): the frozen base in the run's precision (quantized as asked), on `device`."""
    precision = cfg.train.precision
    log(f"device: {device}; precision: {precision}" + (" (frozen base in bf16, LoRA weights and optimizer in fp32)"
                                                       if precision == "bf16" else " (exact)"))
    model, tokenizer = load_model(cfg.model.name, task=cfg.model.task, labels=labels, dtype=dtype_for(precision),
                                  quantize=cfg.model.quantize, quantize_head=cfg.model.quantize_head,
                                  quantize_embeddings=cfg.model.quantize_embeddings)
    model.to(device)  # loaded (and quantized) on the CPU; adapters are made on the weights' device
    if cfg.model.quantize != "none":
        log(f"quantize: {cfg.model.quantize}: {len(quantized_weights(model))} weights quantized; "
            f"model weights in memory: {model_bytes(model) / 1e6:,.1f} MB")
    return model, tokenizer


def _set_up_training(cfg: RunConfig, model: nn.Module, train_set: list[Example], report: dict,
                     log: Callable[[str], None]) -> torch.optim.Optimizer:
    """Inject the method's trainable parts, prepare the fast path (`fast.prepare`) and make the optimizer."""
    methods.setup(model, cfg.method, adapter_config(cfg, model))
    t = cfg.train
    halved = prepare(model, t.precision, t.checkpointing, compile_blocks=t.compile,
                     rows=typical_rows(train_set, t.batch_size))
    report["halved_products"] = rowsplit.describe(halved)  # frozen products timed faster in halves of rows
    if halved:
        log(f"frozen products computed in halves of rows (timed faster on this CPU): {report['halved_products']}")
    log(f"method: {cfg.method.name}; {lorafit.trainable_report(model)}")
    if cfg.method.name == "mezo":  # forward passes only: no gradients, no optimizer state
        return MeZO([p for _, p in trainable_parameters(model)], t.lr, cfg.method.mezo_eps, t.weight_decay, t.seed)
    return make_optimizer(model, t.lr, t.weight_decay)


def _save_result(cfg: RunConfig, model: nn.Module, labels: list[str] | None, log: Callable[[str], None]) -> dict:
    """Save what the method trained into out/adapter (with a classifier's labels); returns save_method's info."""
    folder = Path(cfg.out) / "adapter"
    info = methods.save_method(model, folder, cfg.method, cfg.model.name, cfg.model.task)
    if labels is not None:  # the head's classes, in order: what a later load needs to size the head
        write_json(folder / LABELS_FILE, labels)
    log(f"adapter saved to {info['path']} ({info['file_bytes']:,} bytes)")
    return info


def typical_rows(examples: list[Example], batch_size: int) -> int:
    """Tokens in a typical micro-batch: batch_size x the 90th-percentile length (a batch pads to its longest)."""
    lengths = sorted(len(example.input_ids) for example in examples)
    return batch_size * lengths[int(0.9 * (len(lengths) - 1))] if lengths else 0


def pick_metric(cfg: RunConfig, fmt: str) -> str:
    """exact_match for instruction/chat data, accuracy for classification, loss for plain text."""
    if cfg.eval.metric != "auto":
        return cfg.eval.metric
    if cfg.model.task == "classification":
        return "accuracy"
    return "exact_match" if fmt in ("instruction", "chat") else "loss"


def adapter_config(cfg: RunConfig, model: nn.Module) -> lorafit.LoraConfig:
    """The run's LoraConfig, recording the base model and (for classifiers) training the new head in full."""
    extra = []
    if cfg.model.task == "classification":
        head = next(n for n in ("classifier", "score") if hasattr(model, n))
        extra = [head] if head not in cfg.lora.modules_to_save else []
    task_type = "SEQ_CLS" if cfg.model.task == "classification" else "CAUSAL_LM"
    return replace(cfg.lora, base_model=cfg.model.name, task_type=task_type,
                   modules_to_save=[*cfg.lora.modules_to_save, *extra])


def _resume(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, log: Callable[[str], None]) -> dict:
    path = latest_checkpoint(out / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume")
    state = load_checkpoint(path, model, optimizer)
    log(f"resumed from {path} at step {state['step']}")
    return state


def micro_batches(examples: list[Example], batch_size: int, pad_id: int, seed: int, start: int) -> Iterator[dict]:
    """An endless, deterministic stream of shuffled batches, epoch after epoch, skipping the first `start`."""
    per_epoch = math.ceil(len(examples) / batch_size)
    first_epoch, skip = divmod(start, per_epoch)
    for epoch in itertools.count(first_epoch):
        yield from batches(examples, batch_size, pad_id, shuffle=True, seed=seed, epoch=epoch,
                           start=skip if epoch == first_epoch else 0)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, parts: list[dict], clip: float,
               precision: str = "fp32") -> tuple:
    """One optimizer step over `parts` (gradient accumulation); returns (mean loss, tokens seen)."""
    model.train()
    tokens = sum(int(batch["attention_mask"].sum()) for batch in parts)
    if isinstance(optimizer, MeZO):  # two forward passes over all parts, no backward
        model.eval()  # both passes must see the same function: no dropout noise in the difference

        def closure() -> torch.Tensor:
            with autocast(precision, model):
                return sum(loss_of(model, batch) for batch in parts) / len(parts)
        return optimizer.step(closure).item(), tokens
    total = 0.0
    for batch in parts:
        with training(precision, model):
            loss = loss_of(model, batch) / len(parts)
        loss.backward()
        total += loss.item()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, tokens


class _StopOnSigint:
    """Turn the first Ctrl-C into a request to stop at the next step boundary (a second one interrupts at once)."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def run_loop(model: nn.Module, optimizer: torch.optim.Optimizer, train_set: list[Example], val_set: list[Example],
             cfg: RunConfig, state: dict, pad_id: int, log: Callable[[str], None]) -> dict:
    """Steps from state['step'] to cfg.train.steps, logging, evaluating and checkpointing on schedule.

    Ctrl-C finishes the current step, writes a checkpoint and ends the run; `--resume` continues from it.
    """
    t, out = cfg.train, Path(cfg.out)
    stream = micro_batches(train_set, t.batch_size, pad_id, t.seed, state["micro_batches"])
    metrics = MetricsLog(out / "metrics.jsonl", tensorboard=t.tensorboard, append=state["step"] > 0)
    bar = tqdm(total=t.steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    with _StopOnSigint() as sigint, metrics, bar:
        while state["step"] < t.steps:
            step, started = state["step"], time.perf_counter()
            lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
            set_lr(optimizer, lr)
            loss, tokens = train_step(model, optimizer, [next(stream) for _ in range(t.grad_accum)], t.clip,
                                      t.precision)
            seconds = time.perf_counter() - started
            state = {"step": step + 1, "micro_batches": state["micro_batches"] + t.grad_accum,
                     "seconds": state["seconds"] + seconds}
            row = {"step": step + 1, "loss": round(loss, 5), "lr": lr, "tokens_per_s": round(tokens / seconds, 1)}
            if (t.eval_every and (step + 1) % t.eval_every == 0) or step + 1 == t.steps:
                with evaluation(t.precision, model):
                    row["eval_loss"] = round(mean_loss(model, val_set, cfg.eval.batch_size, pad_id), 5)
            metrics.write(row, log if (step + 1) % t.log_every == 0 or "eval_loss" in row else None)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if sigint.requested:
                path = save_checkpoint(out / "checkpoints", model, optimizer, state)
                log(f"interrupted at step {state['step']}: checkpoint saved to {path}; continue with --resume")
                raise SystemExit(130)
            if t.save_every and (step + 1) % t.save_every == 0:
                save_checkpoint(out / "checkpoints", model, optimizer, state)
    save_checkpoint(out / "checkpoints", model, optimizer, state)
    return state


def read_results(out: str | Path) -> dict:
    """The report a finished run wrote."""
    return json.loads((Path(out) / "results.json").read_text())
