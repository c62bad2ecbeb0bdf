"""LoraConfig: what to adapt and how, validated once, and its PEFT `adapter_config.json` form."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field

from .init import from_base, niter
from .peft_schema import BIASES, MAX_ALPHA, checked_fields
from .variants import VARIANTS

INITS = ("kaiming", "gaussian", "pissa", "olora")  # and "pissa_niter_N" (lorafit.core.init)

# PEFT's adapter_config.json keys that lorafit reads, mapped to LoraConfig fields.
_PEFT_TO_LORAFIT = {
    "r": "r",
    "lora_alpha": "alpha",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "use_dora": "use_dora",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "use_rslora": "rslora",
    "bias": "bias",
    "modules_to_save": "modules_to_save",
    "layers_to_transform": "layers",
    "init_lora_weights": "init",
    "base_model_name_or_path": "base_model",
    "task_type": "task_type",
}
# Keys PEFT writes that carry no information for a plain LoRA adapter (or that lorafit derives itself).
_PEFT_NEUTRAL = {
    "peft_type", "peft_version", "fan_in_fan_out", "inference_mode", "revision", "auto_mapping",
    "layers_pattern", "megatron_config", "megatron_core", "loftq_config", "layer_replication", "lora_bias",
    "exclude_modules", "target_parameters", "eva_config", "corda_config", "trainable_token_indices", "use_qalora",
    "qalora_group_size", "lora_ga_config", "ensure_weight_tying", "velora_config",
}  # fmt: skip
# Keys whose non-default value changes the maths: lorafit refuses them rather than load the wrong model.
_PEFT_UNSUPPORTED_IF_SET = {
    "layer_replication": None, "lora_bias": False, "exclude_modules": None, "target_parameters": None,
    "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None, "arrow_config": None,
    "kasa_config": None, "monteclora_config": None, "use_bdlora": None,
}  # fmt: skip


def _pattern_key(pattern: dict, module: str) -> str | None:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the end of the module name,
    at a dot boundary (`q_proj` matches `model.layers.0.self_attn.q_proj`; a key may be a regex)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


class ConfigError(ValueError):
    """A config value (from code, a file or the command line) that lorafit cannot use."""


_INIT_ONLY = ("eva", "orthogonal", "mica")  # PEFT inits that start A and B some other way, the base untouched
_BASE_CHANGED = ("corda", "loftq", "lora_ga")  # ... and those that also rewrite the base weights


def _init_from_peft(value: bool | str, source: str) -> str:
    """LoraConfig.init for PEFT's init_lora_weights (true/false: kaiming). An adapter saved unconverted from a
    PiSSA / OLoRA start is a change to the residual base: PEFT loads it by decomposing the base again, which rebuilds
    the residual only when the decomposition is deterministic; lorafit does the same, and refuses pissa_niter_N."""
    if not isinstance(value, str) or value in _INIT_ONLY:
        return "kaiming"  # a trained adapter of these loads as plain LoRA: its start left the base untouched
    if value in _BASE_CHANGED:
        raise ConfigError(f"{source}: init_lora_weights={value!r}: this adapter was trained on a base that {value} "
                          "changed and lorafit cannot rebuild; save it converted for the original base (PEFT: "
                          "save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if niter(value) is not None:
        raise ConfigError(f"{source}: init_lora_weights={value!r}: this adapter was trained on a residual base from a "
                          "random (svd_lowrank) decomposition that cannot be rebuilt; save it converted for the "
                          "original base (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if from_base(value):
        warnings.warn(f"{source}: init_lora_weights={value!r}: an unconverted {value} adapter; as PEFT does, lorafit "
                      "rewrites the targeted base weights as the residual of the decomposition (right only when the "
                      "model is the original base)", stacklevel=3)
    return value


def _check_regex(pattern: str) -> None:
    """A targets string is a regex over full module names (surgery's re.fullmatch): it must compile."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"targets {pattern!r} is not a valid regular expression ({err}); fix it, or pass a list "
                          "of module names (e.g. [q_proj, v_proj])") from None


@dataclass
class LoraConfig:
    """Which modules get a low-rank update ΔW = BA and how it is built (Hu et al. 2021, section 4)."""

    r: int = 8  # rank of ΔW = BA; A is (r, in), B is (out, r)
    alpha: float = 16.0  # scale = alpha / r (or alpha / sqrt(r) with rslora); section 4.1 of the paper
    dropout: float = 0.0  # dropout on the input of the LoRA branch only
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # suffixes, a regex, "all-linear"
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajievski 2023)
    init: str = "kaiming"  # "kaiming": A kaiming-uniform, B zero; "gaussian": A ~ N(0, 1/r), B zero; "pissa"
    # (or "pissa_niter_N", a fast SVD) / "olora": A, B from the base weight's SVD / QR, the base becomes the residual
    bias: str = "none"  # which biases train too: "none", "lora_only" (of adapted layers), "all"
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full and saved (a new head)
    layers: list[int] | None = None  # only adapt modules inside these block indices (None: all blocks)
    base_model: str | None = None  # name or path of the base model, written to adapter_config.json
    task_type: str | None = None  # PEFT's name for the model head: "CAUSAL_LM", "SEQ_CLS" (None: unrecorded)
    variant: str = "lora"  # the kind of update (lorafit.core.variants): "lora" is plain ΔW = BA, "dora" is DoRA
    use_dora: bool = False  # PEFT's switch for DoRA (Liu et al. 2024): the same as variant "dora"
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name pattern -> its own r (PEFT's rule)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module-name pattern -> its own alpha

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.modules_to_save, (tuple, set)) or self.modules_to_save is None:
            self.modules_to_save = sorted(self.modules_to_save or [])
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha <= MAX_ALPHA:
            raise ConfigError(f"alpha must be a finite number in (0, {MAX_ALPHA:g}], got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS and not (isinstance(self.init, str) and from_base(self.init)):
            raise ConfigError(f"init must be one of {', '.join(INITS)} or pissa_niter_N, got {self.init!r}")
        if self.bias not in BIASES:
            raise ConfigError(f"bias must be one of {BIASES}, got {self.bias!r}")
        if isinstance(self.targets, list) and (not self.targets or not all(isinstance(t, str) for t in self.targets)):
            raise ConfigError(f"targets must be a non-empty list of module names or a regex, got {self.targets!r}")
        if not isinstance(self.targets, (list, str)):
            raise ConfigError(f"targets must be a list of module names or a regex string, got {self.targets!r}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            _check_regex(self.targets)
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(sorted(VARIANTS))}, got {self.variant!r}")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ConfigError(f"layers must be a list of block indices >= 0, got {self.layers!r}")
        self._check_patterns()
        if self.use_dora and self.variant not in ("lora", "dora"):
            raise ConfigError(f"use_dora is DoRA; it cannot be combined with variant {self.variant!r}")
        if self.use_dora or self.variant == "dora":
            self.use_dora, self.variant = True, "dora"

    def _check_patterns(self) -> None:
        """rank_pattern / alpha_pattern: {regex over module names: a positive rank / alpha}."""
        for field_name, check, meaning in (
                ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 "a positive integer"),
                ("alpha_pattern", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                 and 0 < v <= MAX_ALPHA, f"a finite number in (0, {MAX_ALPHA:g}]")):
            pattern = getattr(self, field_name)
            if not isinstance(pattern, dict):
                raise ConfigError(f"{field_name} must be a mapping of module-name patterns to values, got {pattern!r}")
            for key, value in pattern.items():
                try:
                    re.compile(rf"(.*\.)?({key})$")
                except (re.error, TypeError):
                    raise ConfigError(f"{field_name} key {key!r} is not a valid regular expression") from None
                if not check(value):
                    raise ConfigError(f"{field_name}[{key!r}] must be {meaning}, got {value!r}")

    def rank_of(self, module: str) -> int:
        """r of the module called `module` (its full name): rank_pattern's first matching key, else `r`."""
        key = _pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def scale_of(self, module: str) -> float:
        """The factor on BA for the module called `module`: its alpha over its r (or sqrt(r) with rslora)."""
        key = _pattern_key(self.alpha_pattern, module)
        alpha = self.alpha if key is None else self.alpha_pattern[key]
        r = self.rank_of(module)
        return alpha / (math.sqrt(r) if self.rslora else r)

    @property
    def scale(self) -> float:
        """The factor applied to BA where no pattern applies: alpha / r, or alpha / sqrt(r) with rslora."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_peft(self, fan_in_fan_out: bool = False) -> dict:
        """This config as PEFT's adapter_config.json (the fields PEFT, vLLM and transformers read)."""
        return {
            "peft_type": "LORA",
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "use_rslora": self.rslora,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": self.bias,
            "modules_to_save": self.modules_to_save or None,
            "layers_to_transform": self.layers,
            "layers_pattern": None,
            "init_lora_weights": True if self.init == "kaiming" else self.init,  # PEFT's names for the others
            "use_dora": self.use_dora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "task_type": self.task_type,
            "inference_mode": True,
            "revision": None,
        }

    @classmethod
    def from_peft(cls, data: dict, source: str = "adapter_config.json") -> LoraConfig:
        """Read PEFT's adapter_config.json: every read key type-checked (lorafit.core.peft_schema), PEFT's defaults
        for missing ones; unknown keys warn, values lorafit cannot honour raise ConfigError naming file and key."""
        values, problem = checked_fields(data)
        if problem:
            raise ConfigError(f"{source}: {problem}")
        for key, default in _PEFT_UNSUPPORTED_IF_SET.items():
            value = data.get(key)
            if value is not None and (type(value) is not type(default) or value != default):
                raise ConfigError(f"{source}: {key}={value!r} is not supported by lorafit: it changes the model in "
                                  f"a way lorafit does not implement ({key} must be {json.dumps(default)} or absent; "
                                  "see docs/peft.md)")
        unknown = sorted(set(data) - set(_PEFT_TO_LORAFIT) - _PEFT_NEUTRAL)
        if unknown:
            warnings.warn(f"{source}: ignoring config keys lorafit does not know: {', '.join(unknown)}", stacklevel=2)
        kwargs = {ours: values[theirs] for theirs, ours in _PEFT_TO_LORAFIT.items() if values[theirs] is not None}
        kwargs["init"] = _init_from_peft(kwargs.pop("init"), source)
        if isinstance(kwargs.get("layers"), int):
            kwargs["layers"] = [kwargs["layers"]]
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict:
        """Plain dict of the fields (for logs and results files)."""
        return asdict(self)
