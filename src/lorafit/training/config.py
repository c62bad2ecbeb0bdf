"""The training run's configuration: typed sections, read from YAML plus `--section.key value` overrides.

Validated once, here, with pydantic over the plain dataclasses; the rest of the code takes the result as given.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from ..core.config import ConfigError, LoraConfig
from ..core.init import from_base
from ..data import DataConfig
from ..methods import MethodConfig, get
from ..quant import QUANTIZE
from .distributed import PARALLEL
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
    loraplus_lr_ratio: float | None = None  # LoRA+ (Hayou et al. 2024): B's lr is lr x this (they use ~16); null: off
    loraplus_lr_embedding: float | None = None  # LoRA+: peak lr of LoRA on embedding tables (null: PEFT's 1e-6)
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
    parallel: str = "ddp"  # under torchrun: "ddp" (each process holds the model) or "fsdp" (FSDP2 shards it)
    timeout: float = 1800  # seconds a process waits on the others in a collective before it fails (torchrun)

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
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")
        for name in ("loraplus_lr_ratio", "loraplus_lr_embedding"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 (or null: off), got {getattr(self, name)}")
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
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, or null to score every validation row; got {self.limit}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples < 0:
            raise ConfigError(f"samples must be >= 0, got {self.samples}")


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
        if self.data.packing and self.model.task == "classification":
            raise ConfigError("data.packing: applies to causal LM formats, not classification (model.task); drop "
                              "--data.packing")
        if self.train.parallel == "fsdp" and self.model.quantize != "none":
            raise ConfigError(f"train.parallel: fsdp shards plain weights; a quantized base (model.quantize: "
                              f"{self.model.quantize}) keeps packed blocks FSDP2 cannot shard: use parallel: ddp")
        self._check_lora_options()
        if self.train.parallel == "fsdp" and self.train.compile is True:
            raise ConfigError("train.parallel: fsdp runs eager blocks: set train.compile to auto or false")

    def _check_lora_options(self) -> None:
        """LoRA+ needs AdamW over LoRA; an init from the base weights needs them dense."""
        method = get(self.method.name)
        if self.train.loraplus_lr_ratio is not None and (method.optimizer or not method.uses_lora(self.method)):
            why = "has an optimizer of its own" if method.optimizer else "trains no LoRA adapter"
            raise ConfigError(f"train.loraplus_lr_ratio: LoRA+ sets the AdamW learning rate of LoRA's B, and method "
                              f"{self.method.name} {why}: drop it")
        if from_base(self.lora.init) and self.model.quantize != "none":
            raise ConfigError(f"lora.init: {self.lora.init} rewrites the adapted base weights as residuals, which "
                              f"a quantized base (model.quantize: {self.model.quantize}) cannot hold: use quantize: "
                              "none, or init kaiming")

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
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: --{part} was given a value, so it cannot also take keys")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--{key}: value {value!r} is not valid YAML ({getattr(err, 'problem', err)}); "
                              "quote it, e.g. --lora.targets '\"q_proj|v_proj\"'") from None
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
            raise ConfigError(f"{path}: not valid YAML{_yaml_where(err)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train, eval, out)")
        data = _resolve_paths(data, Path(path).parent)
    flags = parse_overrides(overrides or [])
    data = _merge(_short_method(data), flags)
    try:
        return TypeAdapter(RunConfig).validate_python(data)
    except ValidationError as err:
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(_explain(err.errors()[0], source, flags) + more) from None


SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "method": MethodConfig,
            "train": TrainConfig, "eval": EvalConfig}  # the YAML's sections; `out` is the one top-level value
# Names users bring from PEFT and transformers' Trainer, and what lorafit calls them ("did you mean --lora.r?").
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
           "use_rslora": "rslora", "learning_rate": "lr", "max_steps": "steps", "warmup": "warmup_steps",
           "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
           "train_file": "train", "validation_file": "validation", "model_name_or_path": "name"}


def _keys(section: tuple[str, ...]) -> list[str]:
    """The keys allowed at `section` (() for the top level)."""
    if not section:
        return [*SECTIONS, "out"]
    return [f.name for f in fields(SECTIONS[section[0]])] if section[0] in SECTIONS and len(section) == 1 else []


def _flag_path(flags: dict, loc: tuple[str, ...]) -> tuple[str, ...] | None:
    """The full key path of the command-line flag that set `loc` (or a key under it), None if no flag did."""
    node: object = flags
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    while isinstance(node, dict) and node:
        loc, node = (*loc, next(iter(node))), next(iter(node.values()))
    return loc


def _named_key(loc: tuple[str, ...], message: str) -> tuple[str, ...]:
    """The key a section's own check names first ("limit must be >= 1" at eval: eval.limit); else `loc`."""
    first = re.match(r"(\w+)(?:\.(\w+))?", message)
    if first and len(loc) == 1 and first.group(1) in _keys(loc):
        return (*loc, first.group(1))
    if first and not loc and first.group(2) and first.group(2) in _keys((first.group(1),)):
        return first.group(1), first.group(2)
    return loc


def _unknown(path: tuple[str, ...], depth: int, dashes: str) -> str:
    """'unknown key; did you mean --lora.r?' for path[:depth + 1], the part not allowed where it stands."""
    known, given = _keys(path[:depth]), path[depth]
    what = "unknown section" if depth == 0 else "unknown key"
    close = [ALIASES[given]] if ALIASES.get(given) in known else difflib.get_close_matches(given, known, n=1)
    if close:
        return f"{what}; did you mean {dashes}{'.'.join((*path[:depth], close[0], *path[depth + 1:]))}?"
    return f"{what}; {'.'.join(path[:depth]) or 'the top level'} takes {', '.join(known)}"


def _explain(first: dict, source: str, flags: dict) -> str:
    """One line for pydantic's first error: the flag (--lora.r) or the file and key it came from, and the fix."""
    loc = tuple(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        loc = _named_key(loc, message)
        for said in (f"{'.'.join(loc)}: ", f"{loc[-1]} ") if loc else ():  # the blame names the key already
            message = message.removeprefix(said)
    flag = _flag_path(flags, loc)
    path = flag if flag is not None else loc
    blame = f"--{'.'.join(path)}" if flag is not None else f"{source}: {'.'.join(loc) or '(top level)'}"
    if first["type"] == "unexpected_keyword_argument":
        message = _unknown(path, len(loc) - 1, "--" if flag is not None else "")
    elif first["type"] in ("missing_argument", "missing"):  # data.train is the one key without a default
        data = loc[:1] == ("data",)
        blame = f"{source}: data.train" if data else blame
        message = "required key is missing" + ("; pass --data.train FILE or add it to the config" if data else "")
    elif first["type"] == "dataclass_type":
        message = f"is a section, not a value; set its keys (--{loc[0]}.KEY VALUE)"
    elif first["type"].endswith("_type") and isinstance(first.get("input"), dict):  # --out.dir x: out is a path
        message = f"takes a value, not keys under it (--{'.'.join(loc)} VALUE)"
    return f"{blame}: {message}"


def _yaml_where(err: yaml.YAMLError) -> str:
    """' at line 3, column 7: <problem>' for a YAML syntax error (one line, unlike PyYAML's own message)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None:
        return f" ({' '.join(str(err).split())})"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem or 'syntax error'}"
