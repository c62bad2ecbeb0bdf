"""Adapter arithmetic: several LoRA adapter folders in, one weighted combination out, as an ordinary adapter folder.

The result is what PEFT's `add_weighted_adapter(adapters, weights, name, combination_type=method)` builds, worked
out from the folders' tensors and configs alone (no base model is loaded). Per target module, with c_i = w_i ·
scale_i for each adapter i that adapts it:

    linear, ties, dare_linear   A = op(sign(c_i) sqrt|c_i| A_i), B = op(sqrt|c_i| B_i): same rank r in and out
    cat                         A = [c_1 A_1; c_2 A_2; ...], B = [B_1 B_2 ...]: ΔW = Σ c_i B_i A_i exactly, r = Σ r_i
    svd                         ΔW = Σ c_i B_i A_i, split by SVD into rank --rank (default: the largest input r)

The result has lora_alpha = r (scale 1: the inputs' scales are folded into its tensors) and adapts the union of
the inputs' modules; a module some adapters lack is combined from those that have it. Where lorafit departs from
PEFT 0.21.2 it does so on purpose: the result never inherits use_rslora (PEFT's would be sqrt(r) times too
strong, huggingface/peft#3761), a trained head or bias (modules_to_save) saved by one adapter is carried over
(PEFT gives the result a fresh copy of the base module), and one adapter with method svd is re-split by SVD
(PEFT falls back to linear), so a rank can shrink an adapter. Adapters that record different base models are
combined with a warning when every shared module's shapes agree (a hub id and a local folder may name one model);
shapes that differ are an error naming both folders and the key. The CLI is `lorafit combine`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import task_arithmetic as ta
from .adapter_io import CONFIG_FILE, LORAFIT_FILE, PREFIX, WEIGHTS_FILE, read_adapter
from .config import LoraConfig
from .files import check_writable
from .folders import publish_tensors

METHODS = ("linear", "cat", "svd", "ties", "dare_linear")
MAJORITY = ("total", "frequency")
_SAME_RANK = ("linear", "ties", "dare_linear")  # methods that combine A and B entry by entry
_SUFFIXES = {"linear": (".lora_A.weight", ".lora_B.weight"), "embedding": (".lora_embedding_A", ".lora_embedding_B")}
_BIAS_ORDER = ("none", "lora_only", "all")


class CombineError(ValueError):
    """Adapters that cannot be combined, or options that do not fit the method; names the folder and key."""


@dataclass
class CombineSpec:
    """How adapters are combined; the names and meanings of PEFT's `add_weighted_adapter` arguments."""

    method: str = "linear"  # linear, cat, svd, ties or dare_linear (see the module docstring)
    density: float | None = None  # ties, dare_linear: fraction of each tensor's entries kept, in (0, 1]
    majority_sign: str = "total"  # ties: elect each entry's sign by the sum of values ("total") or by count
    rank: int | None = None  # svd: rank of the result (None: the largest input rank, as PEFT)
    svd_clamp: float | None = None  # svd: clamp the factors to this quantile of their entries, in (0, 1]
    seed: int = 0  # dare_linear: seed of the torch generator that draws the drop masks

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CombineError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        needs_density = self.method in ("ties", "dare_linear")
        if needs_density and self.density is None:
            raise CombineError(f"method {self.method} needs a density (the fraction of entries kept, e.g. 0.5)")
        if not needs_density and self.density is not None:
            raise CombineError(f"density applies to ties and dare_linear only, not to {self.method}")
        if self.density is not None and not 0 < self.density <= 1:
            raise CombineError(f"density must be in (0, 1], got {self.density!r}")
        if self.majority_sign not in MAJORITY:
            raise CombineError(f"majority_sign must be one of {', '.join(MAJORITY)}, got {self.majority_sign!r}")
        if self.method != "svd" and (self.rank is not None or self.svd_clamp is not None):
            raise CombineError(f"rank and svd_clamp apply to svd only; {self.method} sets the rank itself "
                               "(cat: the sum of the inputs' ranks; linear, ties, dare_linear: the inputs' rank)")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise CombineError(f"rank must be a positive integer, got {self.rank!r}")
        if self.svd_clamp is not None and not 0 < self.svd_clamp <= 1:
            raise CombineError(f"svd_clamp must be a quantile in (0, 1], got {self.svd_clamp!r}")


@dataclass
class Update:
    """One module's LoRA update in an adapter: A (r, in) and B (out, r); an embedding's A is (r, vocab)."""

    kind: str  # "linear" (lora_A / lora_B) or "embedding" (lora_embedding_A / lora_embedding_B)
    a: torch.Tensor
    b: torch.Tensor


@dataclass
class Adapter:
    """An input adapter: where it came from, its config, its updates by module path and its other tensors."""

    source: str  # the folder, for error messages
    cfg: LoraConfig
    updates: dict[str, Update]
    extras: dict[str, torch.Tensor]  # biases and modules_to_save parameters, by key
    side_files: dict[str, object] = dataclasses.field(default_factory=dict)  # lorafit's own JSON files
    fan_in_fan_out: bool = False  # PEFT's flag for GPT-2's Conv1D layers (the tensors are the same either way)


def module_scale(cfg: LoraConfig, path: str) -> float:
    """The scale of `cfg`'s update at module `path`: its own alpha over its own r (rank_pattern, alpha_pattern)."""
    return cfg.scale_of(path)


def adapter_rank(cfg: LoraConfig) -> int:
    """The largest rank `cfg` gives any module (what PEFT compares and sums)."""
    return max([cfg.r, *cfg.rank_pattern.values()])


def split_tensors(source: str, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Update], dict[str, torch.Tensor]]:
    """An adapter's tensors (keys without PEFT's prefix) as LoRA updates by module path, and the other tensors."""
    updates, extras, halves = {}, {}, {}
    for key, tensor in tensors.items():
        found = [(kind, i) for kind, pair in _SUFFIXES.items() for i, s in enumerate(pair) if key.endswith(s)]
        if not found:
            if ".lora_" in key:  # DoRA's lora_magnitude_vector, lora_bias's lora_B.bias, ...
                raise CombineError(f"{source}: tensor {PREFIX + key} is not plain LoRA; combine reads plain "
                                   "LoRA adapters only (no DoRA, no LoRA bias)")
            extras[key] = tensor
            continue
        kind, i = found[0]
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise CombineError(f"{source}: tensor {PREFIX + key} is {tuple(tensor.shape)} {tensor.dtype}; LoRA "
                               "A and B are 2-d floating-point matrices (conv layers are not supported)")
        halves.setdefault((key.removesuffix(_SUFFIXES[kind][i]), kind), [None, None])[i] = tensor
    for (path, kind), (a, b) in halves.items():
        if a is None or b is None:
            missing = _SUFFIXES[kind][0 if a is None else 1]
            raise CombineError(f"{source}: tensor {PREFIX + path + missing} is missing (the module has only half "
                               "of its LoRA pair)")
        if a.shape[0] != b.shape[1]:
            raise CombineError(f"{source}: {PREFIX + path}: A is {tuple(a.shape)} and B {tuple(b.shape)}, their "
                               "ranks differ")
        if path in updates:
            raise CombineError(f"{source}: module {path} has both lora_A/lora_B and lora_embedding tensors")
        updates[path] = Update(kind, a, b)
    return updates, extras


def read_input(path: str | os.PathLike) -> Adapter:
    """An adapter folder as combine's input: config, updates, other tensors, side files (no pickle)."""
    folder = Path(path)
    cfg, tensors = read_adapter(folder)
    if cfg.variant != "lora" or getattr(cfg, "use_dora", False):
        raise CombineError(f"{folder / CONFIG_FILE}: a {cfg.variant} adapter; combine reads plain LoRA adapters only")
    updates, extras = split_tensors(str(folder), tensors)
    if not updates:
        raise CombineError(f"{folder / WEIGHTS_FILE}: holds no LoRA tensors (lora_A / lora_B); nothing to combine")
    side = {}
    for file in sorted(folder.glob("*.json")):
        if file.name != CONFIG_FILE and file.is_file():
            try:
                side[file.name] = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CombineError(f"{file}: not valid JSON ({err})") from None
    fan = bool(json.loads((folder / CONFIG_FILE).read_text()).get("fan_in_fan_out", False))
    return Adapter(str(folder), cfg, updates, extras, side, fan)


def _natural(path: str) -> list:
    """Sort key: block indices compare as numbers (layers.2 before layers.10), as in the model."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _check_compatible(inputs: list[Adapter], method: str) -> None:
    """Raise CombineError when the inputs' modules do not line up, or their ranks differ where the method needs
    one rank; warn when they record different base models."""
    if method in _SAME_RANK and len({adapter_rank(x.cfg) for x in inputs}) > 1:
        ranks = ", ".join(f"{x.source}: r={adapter_rank(x.cfg)}" for x in inputs)
        raise CombineError(f"method {method} needs adapters of one rank, got {ranks}; use cat or svd to combine "
                           "adapters of different ranks")
    first: dict[str, tuple[Adapter, Update]] = {}
    for x in inputs:
        for path, update in x.updates.items():
            if path not in first:
                first[path] = (x, update)
                continue
            y, seen = first[path]
            same = seen.kind == update.kind and seen.a.shape[1] == update.a.shape[1] and \
                seen.b.shape[0] == update.b.shape[0]
            if not same or (method in _SAME_RANK and seen.a.shape != update.a.shape):
                key = PREFIX + path + _SUFFIXES[update.kind][0]
                raise CombineError(f"{x.source}: {key} is {tuple(update.a.shape)} with B {tuple(update.b.shape)}, "
                                   f"but {y.source} has {tuple(seen.a.shape)} with B {tuple(seen.b.shape)} there "
                                   "(adapters of different base models?)")
    bases = {base for base in (_base_of(x) for x in inputs) if base}
    if len(bases) > 1:
        warnings.warn(f"the adapters record different base models ({', '.join(sorted(bases))}); combining them "
                      "as the module shapes agree, with the first one's as the result's base", stacklevel=3)


def _base_of(x: Adapter) -> str | None:
    side = x.side_files.get(LORAFIT_FILE)
    preset = side.get("base_preset") if isinstance(side, dict) else None
    return preset or x.cfg.base_model


def _combine_module(path: str, present: list[tuple[Adapter, float]], spec: CombineSpec, rank: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined update at module `path` from the adapters that adapt it, with their weights."""
    ups = [x.updates[path] for x, _ in present]
    a_in = [u.a.float() for u in ups]  # (r_i, in) each
    b_in = [u.b.float() for u in ups]  # (out, r_i) each
    coefs = [w * module_scale(x.cfg, path) for x, w in present]  # c_i = w_i · scale_i
    if spec.method == "cat":
        a = torch.cat([t * c for t, c in zip(a_in, coefs, strict=True)])  # (Σ r_i, in)
        b = torch.cat(b_in, dim=1)  # (out, Σ r_i)
        pad = rank - a.shape[0]  # ranks of the adapters that skip this module stay zero
        return torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    if spec.method == "svd":
        delta = ta.weighted_sum([b @ a * module_scale(x.cfg, path) for (x, _), a, b in zip(present, a_in, b_in,
                                                                                            strict=True)],
                                [w for _, w in present])  # (out, in): Σ w_i scale_i B_i A_i
        if rank > min(delta.shape):
            raise CombineError(f"rank {rank} is larger than module {path} allows ({tuple(delta.shape)}: at most "
                               f"{min(delta.shape)}); pass a smaller rank")
        b, a = ta.low_rank_split(delta, rank, spec.svd_clamp)
        return a, b
    # linear, ties, dare_linear: A and B combined entry by entry; the sign of c_i goes on A only
    wa = [(1.0 if c >= 0 else -1.0) * abs(c) ** 0.5 for c in coefs]
    wb = [abs(c) ** 0.5 for c in coefs]
    if spec.method == "linear":
        return ta.weighted_sum(a_in, wa), ta.weighted_sum(b_in, wb)
    if spec.method == "ties":
        return (ta.ties(a_in, wa, spec.density, spec.majority_sign),
                ta.ties(b_in, wb, spec.density, spec.majority_sign))
    a = ta.dare_linear(a_in, wa, spec.density, generator)  # all A masks are drawn before the B masks, as PEFT
    return a, ta.dare_linear(b_in, wb, spec.density, generator)


def _result_config(inputs: list[Adapter], rank: int, paths: list[str]) -> LoraConfig:
    """The first input's config with rank r, alpha r (scale 1), no rslora, and targets selecting every module
    some input adapts: PEFT's form (a union of names, or regexes joined by |) where the inputs share one kind of
    target and one layer selection, else the module paths themselves."""
    cfgs = [x.cfg for x in inputs]
    lists = [isinstance(c.targets, list) for c in cfgs]
    shared = len({json.dumps(c.layers) for c in cfgs}) == 1 and len(set(lists)) == 1 and \
        "all-linear" not in [c.targets for c in cfgs]
    if shared and lists[0]:
        targets, layers = sorted({t for c in cfgs for t in c.targets}), cfgs[0].layers
    elif shared:
        targets, layers = "|".join(f"({c.targets})" for c in cfgs), cfgs[0].layers
    else:
        targets, layers = sorted(paths, key=_natural), None
    saved = sorted({m for c in cfgs for m in c.modules_to_save})
    bias = max((c.bias for c in cfgs), key=_BIAS_ORDER.index)
    return dataclasses.replace(cfgs[0], r=rank, alpha=float(rank), rslora=False, targets=targets, layers=layers,
                               modules_to_save=saved, bias=bias, rank_pattern={}, alpha_pattern={})


def _carried_tensors(inputs: list[Adapter]) -> dict[str, torch.Tensor]:
    """Biases, modules_to_save parameters and saved base embeddings, each from the adapter that has it; two
    adapters that save one parameter in full with different values cannot be combined (PEFT refuses the same)."""
    owner: dict[str, str] = {}
    carried = {}
    for x in inputs:
        for key, tensor in x.extras.items():
            if key in owner and torch.equal(tensor, carried[key]):
                continue  # PEFT saves the base embedding table beside an embedding's LoRA: the same in both
            if key in owner:
                raise CombineError(f"{x.source} and {owner[key]} both save {PREFIX + key} in full, with different "
                                   "values (a bias or a modules_to_save module); such parameters cannot be "
                                   "combined: train one of the adapters without it")
            owner[key], carried[key] = x.source, tensor
    return carried


def _result_dtype(inputs: list[Adapter]) -> torch.dtype:
    """The inputs' dtype where they share one, else fp32 (the maths is done in fp32 either way)."""
    dtypes = {t.dtype for x in inputs for u in x.updates.values() for t in (u.a, u.b)}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def effective_method(spec: CombineSpec, count: int) -> str:
    """The method applied to `count` adapters: one adapter is combined linearly (as PEFT does: there is nothing to
    concatenate, trim or drop against), except that svd still re-splits it (to change its rank)."""
    return "linear" if count == 1 and spec.method != "svd" else spec.method


def combine(inputs: list[Adapter], weights: list[float] | None = None, spec: CombineSpec | None = None,
            generator: torch.Generator | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The combined adapter of `inputs` with `weights` (default: 1 each): its config and its tensors under
    PEFT's keys (without the `base_model.model.` prefix). Pure: reads no file, writes none.

    dare_linear draws its masks from `generator` (default: a new one seeded with spec.seed) module by module in
    path order, each module's A masks (adapter by adapter) before its B masks, as PEFT does within a module.
    """
    spec = spec or CombineSpec()
    weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
    if not inputs:
        raise CombineError("no adapters to combine")
    if len(weights) != len(inputs):
        raise CombineError(f"{len(weights)} weights for {len(inputs)} adapters; give one weight per adapter")
    if effective_method(spec, len(inputs)) != spec.method:
        if spec.method in ("ties", "dare_linear"):
            warnings.warn(f"one adapter: combined as linear, without {spec.method}'s pruning (as PEFT does)",
                          stacklevel=2)
        spec = dataclasses.replace(spec, method="linear", density=None)
    _check_compatible(inputs, spec.method)
    ranks = [adapter_rank(x.cfg) for x in inputs]
    rank = {"cat": sum(ranks), "svd": spec.rank or max(ranks)}.get(spec.method, ranks[0])
    generator = generator or torch.Generator().manual_seed(spec.seed)
    dtype = _result_dtype(inputs)
    paths = sorted({p for x in inputs for p in x.updates}, key=_natural)
    tensors = {}
    for path in paths:
        present = [(x, w) for x, w in zip(inputs, weights, strict=True) if path in x.updates]
        a, b = _combine_module(path, present, spec, rank, generator)
        suffix_a, suffix_b = _SUFFIXES[present[0][0].updates[path].kind]
        tensors[path + suffix_a] = a.to(dtype).contiguous()
        tensors[path + suffix_b] = b.to(dtype).contiguous()
    tensors.update(_carried_tensors(inputs))
    return _result_config(inputs, rank, paths), tensors


def _check_out(out: Path, sources: list[Path]) -> None:
    """Refuse an output folder that is an input, or an existing folder that is not an adapter (replacing it
    would delete its files), before any work starts."""
    if out.exists() and not out.is_dir():
        raise CombineError(f"{out}: exists and is a file; pass a folder path for the combined adapter")
    if out.is_dir():
        if any(out.resolve() == s.resolve() for s in sources):
            raise CombineError(f"{out}: is one of the adapters being combined; write the result to another folder")
        if any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
            raise CombineError(f"{out}: exists and is not an adapter folder; pass a new or empty folder")
    check_writable(out)


def combine_adapters(paths: list[str | os.PathLike], out: str | os.PathLike, weights: list[float] | None = None,
                     spec: CombineSpec | None = None, generator: torch.Generator | None = None) -> dict:
    """Combine the adapter folders `paths` with `weights` into the adapter folder `out`, written as a whole.

    `out` is a PEFT adapter folder like `save_adapter`'s (lorafit.load_adapter, PEFT, `lorafit generate`, `merge`
    and `serve` take it), with the first input's side files (lorafit.json, the prompt record, labels.json).
    Returns {"path", "file_bytes", "tensor_bytes", "r", "alpha", "modules", "method"}.
    """
    out, sources = Path(out).expanduser(), [Path(p).expanduser() for p in paths]
    _check_out(out, sources)
    inputs = [read_input(p) for p in sources]
    spec = spec or CombineSpec()
    cfg, tensors = combine(inputs, weights, spec, generator)
    peft = cfg.to_peft(fan_in_fan_out=any(x.fan_in_fan_out for x in inputs))
    files = {CONFIG_FILE: peft, **inputs[0].side_files}
    written = publish_tensors(out, WEIGHTS_FILE, {PREFIX + k: v for k, v in tensors.items()}, files)
    modules = sum(k.endswith((".lora_A.weight", ".lora_embedding_A")) for k in tensors)
    return {**written, "r": cfg.r, "alpha": cfg.alpha, "modules": modules,
            "method": effective_method(spec, len(inputs))}
