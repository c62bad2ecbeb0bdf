"""The training run's configuration: typed sections, read from YAML plus `--section.key value` overrides.

Validated once, here, with pydantic over the plain dataclasses; the rest of the code takes the result as given.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from ..core.config import ConfigError, LoraConfig
from ..data import DataConfig
from ..methods import MethodConfig, get
from ..quant import QUANTIZE
from .runtime import PRECISIONS

STRICT = ConfigDict(extra="forbid")  # an unknown key is an error, never silently ignored


@dataclass
class ModelConfig:
    """Which base model to fine-tune."""

    __pydantic_config__ = STRICT
    name: str = "smollm2-135m-instruct"  # preset name, local Hugging Face dir, .gguf file, or hub id
    task: str = "causal-lm"  # "causal-lm" (generation) or "classification" (encoder + new head)
    quantize: str = "none"  # frozen block weights: none | nf4 | int8 | gguf (the .gguf file's own blocks)
    quantize_head: bool = False  # also an untied output head (nf4 / int8)
    quantize_embeddings: bool = False  # also the input embedding table, and a head tied to it (gguf: token_embd)

    def __post_init__(self) -> None:
        if self.task not in ("causal-lm", "classification"):
            raise ConfigError(f"task must be 'causal-lm' or 'classification', got {self.task!r}")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize_head and self.quantize not in ("nf4", "int8"):
            raise ConfigError(f"quantize_head needs quantize: nf4 or int8 (quantize is {self.quantize!r})")
        if self.quantize_embeddings and self.quantize == "none":
            raise ConfigError("quantize_embeddings needs quantize: nf4, int8 or gguf (quantize is 'none')")


@dataclass
class TrainConfig:
    """The optimisation recipe: AdamW, linear warm-up then cosine decay, clipping, accumulation."""

    __pydantic_config__ = STRICT
    steps: int = 200  # optimizer steps in the run
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    lr: float = 2e-4  # peak learning rate (LoRA tolerates ~10x the full fine-tuning rate)
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the trainable parameters
    warmup_steps: int = 10  # linear warm-up from 0 to lr
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    clip: float = 1.0  # max global grad norm; 0 turns clipping off
    eval_every: int = 50  # validation loss every N steps (0: only at the end)
    save_every: int = 50  # checkpoint every N steps (0: only at the end)
    log_every: int = 10  # metrics line every N steps
    seed: int = 0  # data order, dropout and new-weight init
    tensorboard: bool = False  # also write TensorBoard scalars under out/tensorboard
    precision: str = "auto"  # "bf16": frozen base in bf16, LoRA in fp32; "fp32": exact; "auto": bf16 where fast
    checkpointing: bool = False  # recompute each block's activations during backward: less memory, ~1/3 more work
    compile: bool | str = "auto"  # torch.compile each block (a slow first step, faster ones after); "auto": for
    # runs long enough that it pays (bf16 on a CPU, unquantized, a working C++ compiler)
    device: str = "auto"  # "cpu", "cuda" / "cuda:N", or "auto": the GPU where CUDA has one, else the CPU

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.compile is True or self.compile is False or self.compile == "auto"):
            raise ConfigError(f"compile must be true, false or auto, got {self.compile!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got lr={self.lr}, "
                              f"min_lr_ratio={self.min_lr_ratio}")


@dataclass
class EvalConfig:
    """How the base model and the adapter are scored on the validation split."""

    __pydantic_config__ = STRICT
    metric: str = "auto"  # exact_match | accuracy | loss | auto (exact_match for instruction/chat, else by task)
    max_new_tokens: int = 16  # generation budget for exact match
    limit: int | None = None  # score at most this many validation rows (None: all)
    batch_size: int = 16  # rows per generation / scoring batch
    compare_base: bool = True  # also score the base model (adapter disabled) before training
    samples: int = 5  # generations shown after training

    def __post_init__(self) -> None:
        if self.metric not in ("auto", "exact_match", "accuracy", "loss"):
            raise ConfigError(f"metric must be auto, exact_match, accuracy or loss, got {self.metric!r}")


@dataclass
class RunConfig:
    """Everything `lorafit train` needs. Sections mirror the YAML file."""

    __pydantic_config__ = STRICT
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = "runs/lorafit"  # output folder: adapter/, checkpoints/, metrics.jsonl, loss.png

    def __post_init__(self) -> None:
        if self.model.quantize != "none" and get(self.method.name).trains_base(self.method):
            raise ConfigError(f"model.quantize: {self.model.quantize} freezes the base in quantized form, but method "
                              f"{self.method.name} trains base weights; use quantize: none with it")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_overrides(args: list[str]) -> dict:
    """['--lora.r', '16', '--train.lr=2e-4'] -> {'lora': {'r': 16}, 'train': {'lr': 0.0002}} (values read as YAML)."""
    tree: dict = {}
    items = list(args)
    while items:
        arg = items.pop(0)
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"override {arg!r} should look like --section.key value (e.g. --lora.r 16)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not items:
                raise ConfigError(f"override --{key} has no value")
            value = items.pop(0)
        if key == "method":  # `--method full` is short for `--method.name full`
            key = "method.name"
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve_paths(data: dict, config_dir: Path) -> dict:
    """Relative data paths in a config file are relative to that file, so a config runs from any folder."""
    section = dict(data.get("data") or {})
    for key in ("train", "validation"):
        value = section.get(key)
        if isinstance(value, str) and not os.path.isabs(value) and (config_dir / value).exists():
            section[key] = str(config_dir / value)
    return {**data, "data": section} if section else data


def _short_method(data: dict) -> dict:
    """`method: full` is short for `method: {name: full}`."""
    return {**data, "method": {"name": data["method"]}} if isinstance(data.get("method"), str) else data


def load_run_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply overrides, validate everything; ConfigError names the file and the key."""
    source = str(path) if path else "command line"
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train, eval, out)")
        data = _resolve_paths(data, Path(path).parent)
    data = _merge(_short_method(data), parse_overrides(overrides or []))
    try:
        return TypeAdapter(RunConfig).validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "unexpected_keyword_argument":
            message = "unknown key"
        elif first["type"] in ("missing_argument", "missing"):
            message = "required key is missing"
        elif first["type"].endswith("_type") and isinstance(first.get("input"), dict):  # --out.dir x: out is a path
            message = f"takes a value, not keys under it (--{where} VALUE)"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"{source}: {where}: {message}{more}") from None
