"""`lorafit train`: load, inject, data, optimizer, loop of train_step / evaluate / save_checkpoint, report.

Read `train` and `_run` top to bottom: they are the whole recipe. The loop runs on plain PyTorch; the only transformers
objects are the model and its tokenizer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .. import methods
from ..core.adapter_io import LABELS_FILE, LORAFIT_FILE
from ..core.anatomy import head_of
from ..core.config import ConfigError, LoraConfig
from ..core.files import write_json
from ..core.surgery import trainable_parameters, trainable_report
from ..data import PROMPT_FILE, Example, encode, label_set, load_splits, prompt_record
from ..inference.scoring import in_context_score, pick_metric, score
from ..models import PRESETS, load_model
from ..quant import model_bytes, quantized_weights
from . import distributed
from .checkpoint import load_checkpoint, read_state, resume_point
from .config import RunConfig
from .cpu import rowsplit
from .cpu.memory import PeakWindow, allocator
from .distributed import Replicas
from .fingerprint import check_resume, fingerprint
from .loop import loss_of, run_loop
from .loss import release_scratch
from .optim import make_optimizer
from .preflight import preflight
from .report import plot_before_after, plot_loss
from .runfolder import LOCK, RunFolderError, claim, run_lock
from .runtime import dtype_for, evaluation, prepare, resolve_compile, resolve_device, resolve_precision


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, force: bool = False,
          log: Callable[[str], None] = print) -> dict | None:
    """Run the whole job `cfg` describes; returns (and writes to out/results.json) the before/after report.

    One run per out folder: the folder is locked while the run lasts (`runfolder.run_lock`). A new run refuses a
    folder that holds an earlier run unless `overwrite` (which clears it first). `resume` continues from the
    checkpoint latest.json names (else the newest complete one) if the checkpoint's fingerprint matches this
    config and data (`force` accepts differences that change no step's maths, e.g. more train.steps).

    Under torchrun every process calls this: they join one process group (`distributed.start`), rank 0 owns the
    out folder and the report, and the others return None.
    """
    if force and not resume:
        raise RunFolderError("--force only applies to --resume (it accepts harmless config changes)")
    world = distributed.start(resolve_device(cfg.train.device), cfg.train.timeout)
    try:
        if not world.main:
            distributed.barrier(world)  # until rank 0 has claimed the out folder
            return _run(cfg, resume, force, lambda message: None, world)
        return _claimed(cfg, resume, overwrite, force, log, world)
    except RuntimeError as err:
        if world.size > 1 and distributed.peer_failure(err):
            raise distributed.PeerLost(f"rank {world.rank}: {distributed.peer_failure(err)}") from err
        raise
    finally:
        distributed.stop()


def _claimed(cfg: RunConfig, resume: bool, overwrite: bool, force: bool, log: Callable[[str], None],
             world: distributed.World) -> dict:
    """`_run` in the out folder, locked and claimed for this run (the process that writes it: rank 0)."""
    preflight(cfg)  # before any weight loads and before the folder is made: out writable, targets exist
    out = Path(cfg.out)
    made = not out.exists()
    try:
        with run_lock(out):
            claim(out, resume, overwrite, log)
            distributed.barrier(world)
            return _run(cfg, resume, force, log, world)
    except BaseException:
        if made and not any(p.name != LOCK for p in out.iterdir()):  # a run that failed before writing anything
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(cfg: RunConfig, resume: bool, force: bool, log: Callable[[str], None],
         world: distributed.World = distributed.World()) -> dict | None:
    """The recipe itself, in the locked and claimed out folder (rank 0; the other ranks train and return None)."""
    torch.manual_seed(cfg.train.seed)
    train_rows, val_rows, fmt = load_splits(cfg.data, seed=cfg.train.seed, log=log)
    labels = label_set(train_rows, val_rows) if cfg.model.task == "classification" else None
    cfg, device, why = _resolved(cfg, world)  # from here on: train.precision and train.compile as they run
    trains = methods.get(cfg.method.name).trains  # in-context: the frozen model with k examples in every prompt
    if world.size > 1 and not trains:
        raise ConfigError(f"method {cfg.method.name} trains nothing: run it in one process, without torchrun")
    run_id = fingerprint(cfg) if trains else None
    checkpoint = _checked_checkpoint(cfg, run_id, force, log) if resume and trains and world.main else None
    checkpoint = distributed.broadcast(checkpoint, world)  # rank 0 chose it; rank 0 reads it (`load_checkpoint`)
    model, tokenizer = _load_model(cfg, labels, device, log)
    log(f"compile: {'on' if cfg.train.compile else 'off'} ({why})")
    train_set = encode(train_rows, fmt, tokenizer, cfg.data, labels)
    val_set = encode(val_rows, fmt, tokenizer, cfg.data, labels)
    job = _Scoring(cfg, model, tokenizer, fmt, val_rows[:cfg.eval.limit], val_set[:cfg.eval.limit], log)
    report = {**_setting(cfg, device, model, world), "format": fmt, "metric": job.metric, "labels": labels,
              "train_rows": len(train_rows), "val_rows": len(job.rows)}
    if cfg.eval.compare_base and not resume and world.main:  # rank 0 alone scores; the others wait for it
        log("scoring the base model ...")
        report["base"], report["peak_rss_mb_inference"] = job.score()
    if not trains:
        report["tuned"] = in_context_score(model, tokenizer, job.rows, train_rows, fmt, cfg.method.shots,
                                           cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.train.seed, log)
        write_json(Path(cfg.out) / "results.json", report)
        return report

    optimizer, job.replicas = _set_up_training(cfg, model, train_set, report, log, world)
    state = _start(checkpoint, model, optimizer, log, world)
    report["allocator"] = allocator()  # the entry point of the run chose it (`lorafit train` keeps freed memory)
    with PeakWindow() as peak:
        state = run_loop(model, optimizer, train_set, job.examples, cfg, state, tokenizer.pad_token_id, log, run_id,
                         job.replicas)
    job.replicas.gather()  # FSDP2: whole weights from here on, for the adapter and the final scores
    distributed.stop()  # rank 0 alone saves and scores, with no collective left (generate would sync FSDP ranks)
    if not world.main:
        return None
    release_scratch()  # the loss's buffers; evaluation below makes the small ones it needs
    report["communication"] = job.replicas.communication()
    if world.size > 1:
        log(f"communication: {report['communication']['bytes_per_step']:,} bytes per step between the "
            f"{world.size} processes ({report['communication']['counted']})")
    info = _save_result(cfg, model, labels, prompt_record(train_rows, fmt, tokenizer), log)
    report.update(steps=state["step"], train_seconds=round(state["seconds"], 1), adapter=info,
                  trainable=trainable_report(model), peak_rss_mb_train=peak.mb, peak_gpu_mb_train=peak.gpu_mb,
                  trainable_params=sum(p.numel() for _, p in trainable_parameters(model)))
    report["tuned"], report["peak_rss_mb_eval"] = job.score()
    _write_report(Path(cfg.out), report)
    return report


def _setting(cfg: RunConfig, device: torch.device, model: nn.Module, world: distributed.World) -> dict:
    """The report's record of what ran: model, method, device, precision, quantization, compile, processes."""
    return {"model": cfg.model.name, "method": cfg.method.name, "device": str(device),
            "precision": cfg.train.precision, "quantize": cfg.model.quantize,
            "quantize_embeddings": cfg.model.quantize_embeddings, "compile": cfg.train.compile,
            "model_bytes": model_bytes(model), "world_size": world.size}


@dataclass
class _Scoring:
    """What scoring the model on the validation rows takes (before training, and after)."""

    cfg: RunConfig
    model: nn.Module
    tokenizer: object
    fmt: str
    rows: list[dict]
    examples: list[Example]
    log: Callable[[str], None]
    replicas: Replicas | None = None  # set once training is set up: its evaluation loss

    def __post_init__(self) -> None:
        self.metric = pick_metric(self.cfg.eval.metric, self.cfg.model.task, self.fmt)

    def score(self) -> tuple[dict, float]:
        """(the scores, the peak RSS in MB while scoring)."""
        e = self.cfg.eval
        with PeakWindow() as peak, evaluation(self.cfg.train.precision, self.model):
            scores = score(self.model, self.tokenizer, self.metric, self.rows, self.examples, self.fmt, e.batch_size,
                           e.max_new_tokens, self.log, loss=self.replicas.eval_loss if self.replicas else loss_of)
        return scores, peak.mb


def _write_report(out: Path, report: dict) -> None:
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    plot_before_after(report, out / "before_after.png")
    write_json(out / "results.json", report)


def _resolved(cfg: RunConfig, world: distributed.World) -> tuple[RunConfig, torch.device, str]:
    """(cfg with train.precision and train.compile resolved on this machine, the device, why compile is on or off).

    Under torchrun on CUDA, each process takes the GPU of its local rank."""
    device = resolve_device(cfg.train.device)
    if world.size > 1 and device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {world.rank}: local rank {world.local_rank} has no GPU of its own (this machine "
                              f"has {torch.cuda.device_count()}): start at most that many processes per node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.train.precision, device)
    compiled, why = resolve_compile(cfg.train.compile, cfg.train.steps, device, precision, cfg.model.quantize != "none")
    if world.size > 1 and cfg.train.parallel == "fsdp":
        compiled, why = False, "off under FSDP2"
    return replace(cfg, train=replace(cfg.train, precision=precision, compile=compiled)), device, why


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
                     log: Callable[[str], None], world: distributed.World) -> tuple[torch.optim.Optimizer, Replicas]:
    """Inject the method's trainable parts, prepare the fast path (`runtime.prepare`), spread the model over the
    processes (DDP or FSDP2, `distributed.Replicas`) and make the optimizer over what this process holds."""
    methods.setup(model, cfg.method, adapter_config(cfg, model))
    t = cfg.train
    halved = prepare(model, t.precision, t.checkpointing, compile_blocks=t.compile,
                     rows=typical_rows(train_set, -(-t.batch_size // world.size)))
    report["halved_products"] = rowsplit.describe(halved)  # frozen products timed faster in halves of rows
    if halved:
        log(f"frozen products computed in halves of rows (timed faster on this CPU): {report['halved_products']}")
    log(f"method: {cfg.method.name}; {trainable_report(model)}")
    own = methods.get(cfg.method.name).optimizer  # MeZO: forward passes only, no gradients, no optimizer state
    replicas = Replicas(model, loss_of, world, t.parallel, t.precision, gradients=own is None)
    if world.size > 1:
        log(f"distributed: {world.size} processes, {t.parallel if own is None else 'replicated (MeZO)'}; "
            f"train.batch_size {t.batch_size} is the global batch, cut in {world.size} shards")
    if own is not None:
        return own([p for _, p in trainable_parameters(model)], t.lr, t.weight_decay, t.seed, cfg.method), replicas
    return make_optimizer(model, t.lr, t.weight_decay, t.loraplus_lr_ratio, t.loraplus_lr_embedding), replicas


def _save_result(cfg: RunConfig, model: nn.Module, labels: list[str] | None, prompt: dict,
                 log: Callable[[str], None]) -> dict:
    """Save what the method trained into out/adapter, with a classifier's labels and the prompt record (how the
    rows were laid out, so generation lays a user's text out the same way); returns save_method's info."""
    folder = Path(cfg.out) / "adapter"
    side = {LABELS_FILE: labels} if labels is not None else {}  # the head's classes, in order: sizes the head
    if cfg.model.name in PRESETS:  # adapter_config.json records the hub id, for PEFT; this, for lorafit
        side[LORAFIT_FILE] = {"base_preset": cfg.model.name}
    side[PROMPT_FILE] = prompt
    info = methods.save_method(model, folder, cfg.method, cfg.model.name, cfg.model.task, side_files=side)
    log(f"adapter saved to {info['path']} ({info['file_bytes']:,} bytes)")
    return info


def typical_rows(examples: list[Example], batch_size: int) -> int:
    """Tokens in a typical micro-batch: batch_size x the 90th-percentile length (a batch pads to its longest)."""
    lengths = sorted(len(example.input_ids) for example in examples)
    return batch_size * lengths[int(0.9 * (len(lengths) - 1))] if lengths else 0


def adapter_config(cfg: RunConfig, model: nn.Module) -> LoraConfig:
    """The run's LoraConfig, recording the base model and (for classifiers) training the new head in full."""
    extra = []
    if cfg.model.task == "classification":
        head = head_of(model)
        extra = [head] if head not in cfg.lora.modules_to_save else []
    task_type = "SEQ_CLS" if cfg.model.task == "classification" else "CAUSAL_LM"
    preset = PRESETS.get(cfg.model.name)  # a preset is recorded as the hub id of the model it packages
    return replace(cfg.lora, base_model=preset.hub_id if preset else cfg.model.name, task_type=task_type,
                   modules_to_save=[*cfg.lora.modules_to_save, *extra])


def _checked_checkpoint(cfg: RunConfig, run_id: dict, force: bool, log: Callable[[str], None]) -> Path:
    """The checkpoint `--resume` continues from, once its fingerprint is checked against this run's `run_id`."""
    folder = Path(cfg.out) / "checkpoints"
    path = resume_point(folder, log)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {folder}; start the run anew with --overwrite "
                                "instead of --resume")
    saved = read_state(path)
    accepted = check_resume(saved.get("fingerprint"), run_id, force, path)
    if accepted:
        log("--force: continuing with " + "; ".join(f"{key}: {change}" for key, change in accepted.items()))
    if saved["step"] > cfg.train.steps:
        raise RunFolderError(f"--resume: {path} is at step {saved['step']}, past train.steps {cfg.train.steps}")
    return path


def _start(path: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, log: Callable[[str], None],
           world: distributed.World) -> dict:
    """The loop's starting state: step 0, or the checkpoint at `path` loaded into the model and optimizer."""
    if path is None:
        return {"step": 0, "micro_batches": 0, "seconds": 0.0}
    state = load_checkpoint(path, model, optimizer, world)
    log(f"resumed from {path} at step {state['step']}")
    return state


def read_results(out: str | Path) -> dict:
    """The report a finished run wrote."""
    return json.loads((Path(out) / "results.json").read_text())
