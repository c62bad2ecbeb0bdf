"""Loading base models: presets, local Hugging Face folders, GGUF files, hub ids; saving a merged model.

The only module that knows how transformers loads models (presets come from lorafit.models.presets).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..core.files import check_writable, os_errors_named
from ..core.merge import unload
from ..quant import dequantize_model, quantize_model
from . import gguf_cache
from .presets import GGUF_MAGIC, PRESETS, TASKS, ModelError, _preset_list, _swap_in, fetch

# What transformers raises for an unreadable model: struct.error and EOFError come from a truncated GGUF file,
# SafetensorError from a damaged weights file.
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, IndexError, EOFError, struct.error, SafetensorError)


def check_gguf(path: Path) -> None:
    """Refuse a .gguf path that is not a GGUF file before transformers spends seconds failing on it."""
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path}: not a GGUF file (it does not start with b'GGUF'); re-download it")


def _looks_like_hub_id(model: str) -> bool:
    """owner/name with hub-legal characters: what from_pretrained would look up online."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) is not None and not model.endswith(".gguf")


def resolve(model: str) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for a preset name, a model folder, a .gguf file or a hub id.

    A preset is fetched when it is not cached. A hub id is passed through to transformers untouched: it works
    only online (or from the Hugging Face cache), and nothing in lorafit depends on it.
    """
    if model in PRESETS:
        model = str(fetch(model))
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path}: a single file must be a .gguf model; otherwise pass the model's folder "
                             "(the one with config.json)")
        check_gguf(path)
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; it holds GGUF files: pass one of them, e.g. {ggufs[0]}" if ggufs else ""
        raise ModelError(f"{path}: a folder without config.json is not a Hugging Face model folder{hint}")
    if _looks_like_hub_id(model):
        return model, None
    close = difflib.get_close_matches(model, PRESETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ModelError(f"model {model!r} not found: it is not a preset ({_preset_list()}), an existing model folder "
                     f"or .gguf file, or a Hugging Face hub id (owner/name){hint}")


def _load_failed(model: str, where: str, gguf: str | None, what: str, err: Exception) -> ModelError:
    """A ModelError that says what was loaded from where, why it failed and what to try."""
    reason = f"{type(err).__name__}: {' '.join(str(err).split())}"  # one line: the CLI prints just this
    if gguf:
        return ModelError(f"{Path(where) / gguf}: transformers could not read this GGUF {what} ({reason}); the file "
                          "may be truncated or of an architecture transformers cannot load: re-download it or pass "
                          "a Hugging Face model folder")
    if not Path(where).exists():
        return ModelError(f"{model!r}: not a local path, and loading it as a Hugging Face hub id failed ({reason}); "
                          f"go online, or use a preset ({_preset_list()}) or a local model folder")
    return ModelError(f"{where}: transformers could not load the {what} ({reason})")


def _tokenizer(model: str, where: str, gguf: str | None):
    """AutoTokenizer from a resolved location, with a pad token (eos, else unk) so batches can be padded."""
    return _with_pad(_read_tokenizer(model, where, gguf))


def _read_tokenizer(model: str, where: str, gguf: str | None, dense: Path | None = None):
    """AutoTokenizer as transformers gives it, from a resolved location or from `dense`, its GGUF file's dense copy
    (which then records the GGUF file's folder as its origin, as a load from the file does)."""
    from transformers import AutoTokenizer  # heavy: seconds to import

    source, extra = (dense, {}) if dense else (where, {"gguf_file": gguf} if gguf else {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except LOAD_ERRORS as err:
        raise _load_failed(model, where, gguf, "tokenizer", err) from err
    if dense:
        tokenizer.name_or_path = where
    return tokenizer


def _with_pad(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_tokenizer(model: str):
    """The tokenizer of `model` (preset, folder, .gguf file or hub id; from the GGUF file when there is one).

    pad_token is set to eos (else unk) when the model has none: padding is masked out, so its id only matters
    for being a valid token.
    """
    where, gguf = resolve(model)
    return _tokenizer(model, where, gguf)


def load_config(model: str):
    """The transformers config of `model` (preset, folder, .gguf file or hub id), without loading its weights."""
    from transformers import AutoConfig  # heavy: seconds to import

    where, gguf = resolve(model)
    try:
        return AutoConfig.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    except LOAD_ERRORS as err:
        raise _load_failed(model, where, gguf, "config", err) from err


def _head_kwargs(labels: list[str] | None) -> dict:
    """from_pretrained arguments that size a classification head for `labels` (none: keep the checkpoint's)."""
    if labels is None:
        return {}
    if not labels or len(set(labels)) != len(labels):
        raise ModelError(f"labels must be distinct and non-empty, got {labels!r}")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


def load_model(model: str, task: str = "causal-lm", labels: list[str] | None = None,
               dtype: torch.dtype = torch.float32, quantize: str = "none",
               quantize_head: bool = False, quantize_embeddings: bool = False) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer) for a preset name, a model folder, a .gguf file or a hub id.

    task "causal-lm" gives AutoModelForCausalLM; "classification" gives AutoModelForSequenceClassification with
    a head of len(labels) classes (newly initialised unless the checkpoint has one that size) and id2label /
    label2id set; labels=None keeps the checkpoint's own labels. A GGUF file is dequantized to `dtype` on load;
    transformers' conversion is kept in the lorafit cache (gguf_cache), so later loads of that file read it
    instead: the same model in a fraction of the time (LORAFIT_GGUF_CACHE=0 converts every time).
    config.pad_token_id is set from the tokenizer (sequence classification needs it to find the last token).
    quantize "nf4" / "int8" / "gguf" stores the blocks' Linear weights quantized (lorafit.quant): "gguf" keeps
    the blocks of the .gguf file the model comes from instead of their dequantized copies; quantize_head also
    quantizes an untied output head (nf4 / int8), quantize_embeddings the input embedding table and a head tied
    to it.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # heavy: seconds to import

    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if labels is not None and task != "classification":
        raise ModelError(f"labels={labels!r} only apply to task='classification' (task is {task!r})")
    if quantize == "none" and (quantize_head or quantize_embeddings):
        raise ModelError("quantizing the head or the embeddings needs quantize: nf4, int8 or gguf")
    kwargs = {"dtype": dtype, **_head_kwargs(labels if task == "classification" else None)}
    where, gguf = resolve(model)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    dense = _dense_copy(model, where, gguf, dtype) if gguf and gguf_cache.enabled() else None
    try:
        net, tokenizer = _read(model, where, gguf, dense, auto, kwargs, new_head=task == "classification")
    except ModelError:
        if dense is None:
            raise
        gguf_cache.discard(dense)  # damaged after it was written: convert the GGUF file again
        dense = _dense_copy(model, where, gguf, dtype)
        net, tokenizer = _read(model, where, gguf, dense, auto, kwargs, new_head=task == "classification")
    tokenizer = _with_pad(tokenizer)
    net.config.pad_token_id = tokenizer.pad_token_id
    if quantize != "none":
        _quantize(net, quantize, Path(where) / gguf if gguf else None, quantize_head, quantize_embeddings)
    return net.eval(), tokenizer


def _read(model: str, where: str, gguf: str | None, dense: Path | None, auto, kwargs: dict, new_head: bool):
    """(model, tokenizer) as transformers gives them from a resolved location, or from `dense`, the dense copy of
    its GGUF file: that model records the GGUF file's folder as its origin, as a load from the file does (adapters
    saved from it record that folder as their base model)."""
    tokenizer = _read_tokenizer(model, where, gguf, dense)
    source, extra = (dense, {}) if dense else (where, _gguf_kwargs(gguf) if gguf else {})
    try:
        with _quiet_loading(new_head):
            net = auto.from_pretrained(source, **kwargs, **extra)
    except LOAD_ERRORS as err:
        raise _load_failed(model, where, gguf, "model", err) from err
    if dense:
        net.name_or_path = net.config.name_or_path = where
    return net, tokenizer


def _dense_copy(model: str, where: str, gguf: str, dtype: torch.dtype) -> Path | None:
    """The folder holding GGUF file where/gguf as transformers converts it to `dtype` (lorafit.models.gguf_cache):
    converted and saved on first use; None when it cannot be saved (the caller loads the file itself)."""
    import transformers  # heavy: seconds to import

    def convert(folder: Path) -> None:
        net, tokenizer = _read(model, where, gguf, None, transformers.AutoModelForCausalLM, {"dtype": dtype},
                               new_head=False)
        architectures = net.config.architectures  # None after a GGUF load; save_pretrained sets it
        with _quiet_loading(new_head=False), os_errors_named(folder):  # a full disk is an OSError
            net.save_pretrained(folder)  # model.safetensors, config.json, generation_config.json
            net.config.architectures = architectures
            net.config.save_pretrained(folder)  # config.json exactly as the conversion gave it
            tokenizer.save_pretrained(folder)  # tokenizer.json, tokenizer_config.json, the chat template

    dtype_name = str(dtype).removeprefix("torch.")
    return gguf_cache.dense_copy(Path(where) / gguf, dtype_name, transformers.__version__, convert)


@contextlib.contextmanager
def _quiet_loading(new_head: bool):
    """transformers' loading without its progress bars (a load takes seconds) and, for a classifier, without its
    warning that the head is newly initialised: lorafit trains that head, or loads it from the adapter. Both are
    restored afterwards."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # heavy: seconds to import
    from transformers.utils import logging as hf_logging  # heavy: seconds to import

    bars, verbosity, gguf_bar = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)  # the GGUF reader's bar ignores the switch above
    if new_head:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_bar
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _gguf_kwargs(gguf: str) -> dict:
    """from_pretrained arguments for a GGUF file: always dequantized to plain modules.

    transformers 5.24 can also keep GGUF blocks packed in modules of its own, when the `kernels` package serves
    it a matmul kernel (fetched from the Hugging Face hub); LoRA cannot wrap those. Asking for the dequantized
    model makes the result the same whether or not that package is installed (quantize="gguf" keeps the blocks
    lorafit's own way afterwards).
    """
    try:
        from transformers import GgufConfig  # heavy: seconds to import
    except ImportError:  # older transformers always dequantize
        return {"gguf_file": gguf}
    return {"gguf_file": gguf, "quantization_config": GgufConfig(dequantize=True)}


def _quantize(net: torch.nn.Module, method: str, gguf_file: Path | None, head: bool, embeddings: bool) -> None:
    """lorafit.quant.quantize_model, with its errors as ModelErrors that name the file."""
    if method == "gguf" and gguf_file is None:
        raise ModelError("quantize: gguf keeps the blocks of a GGUF file; this model was not loaded from one "
                         "(use nf4 or int8)")
    try:
        quantize_model(net, method, gguf_file, head=head, embeddings=embeddings)
    except ValueError as err:  # GGUFError included: an unsupported file or block type
        raise ModelError(str(err)) from None


def _forget_gguf_origin(model: torch.nn.Module) -> None:
    """A GGUF model is dequantized at load, but transformers still marks it quantized and refuses to save it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in type(quantizer).__name__.lower():
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)


def check_merge_target(out: str | Path, overwrite: bool = False) -> None:
    """Refuse an output folder `save_merged` cannot or may not fill, before any model is loaded or touched."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is a file; pass a folder path for the merged model")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"{out}: exists and is not empty; pass --overwrite (overwrite=True in Python) to "
                         "replace it")
    check_writable(out)


def save_merged(model: torch.nn.Module, tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Write `model` as a plain Hugging Face model folder (safetensors, config.json, tokenizer files) at `out`.

    The model is consumed: lorafit.unload merges the active adapter into the base weights and puts the plain
    modules back, so it no longer carries adapters afterwards. The folder is written beside `out` and renamed
    into place; an existing non-empty `out` is refused (before the model is touched) unless overwrite=True.
    Any AutoModelForCausalLM / AutoModelForSequenceClassification.from_pretrained(out) loads the result.
    """
    out = Path(out).expanduser()
    check_merge_target(out, overwrite)
    unload(model)
    dequantize_model(model)  # block weights the adapter did not touch are still quantized: the file holds them dense
    _forget_gguf_origin(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared model folder
    try:
        with os_errors_named(out):  # safetensors wraps a full disk in its own error
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
