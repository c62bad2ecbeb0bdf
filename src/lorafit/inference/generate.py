"""Using adapters: load a base model with one or more adapters, lay a user's text out as training did (the
adapter's prompt record, lorafit.data.prompt), generate with streaming, chat."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import TextStreamer

from ..core.adapter_io import CONFIG_FILE, LABELS_FILE, LORAFIT_FILE, load_adapter
from ..data import PROMPT_FILE, user_prompt_ids
from ..data.prompt import check_record
from ..methods import METHOD_CONFIG, is_method_folder, load_method
from ..methods.virtual import virtual_tokens_of
from ..models import PRESETS, load_model, preset_of
from .scoring import generate_ids


def _adapter_json(adapter: str | Path, name: str | None = None):
    """A JSON file of an adapter folder: by default its config (PEFT's, or a non-LoRA method's)."""
    name = name or (METHOD_CONFIG if is_method_folder(adapter) else CONFIG_FILE)
    path = Path(adapter) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {adapter} an adapter folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def base_model_of(adapter: str | Path) -> str:
    """The base model an adapter folder was trained on, as lorafit loads it.

    lorafit's own record (`lorafit.json`: the preset) first; else adapter_config.json's base_model_name_or_path,
    with a preset's cache folder (what PEFT records for an adapter made on a preset) mapped back to the preset.
    A recorded local path that is not on this machine is an error that says what to pass instead.
    """
    preset = _adapter_json(adapter, LORAFIT_FILE).get("base_preset") if (Path(adapter) / LORAFIT_FILE).is_file() \
        else None
    if preset:
        return preset
    name = _adapter_json(adapter).get("base_model_name_or_path")
    source = Path(adapter) / (METHOD_CONFIG if is_method_folder(adapter) else CONFIG_FILE)
    if not name:
        raise ValueError(f"{source}: no base_model_name_or_path recorded; pass --model")
    preset = preset_of(name)
    if preset:
        return preset
    if (name.startswith(("/", "~", ".")) or "\\" in name) and not Path(name).expanduser().exists():
        raise ValueError(f"{source}: the base model {name!r} is not on this machine; pass --model (a preset: "
                         f"{', '.join(PRESETS)}; a model folder; or a .gguf file)")
    return name


def task_of(adapter: str | Path) -> tuple[str, list[str] | None]:
    """(task, class names) an adapter was trained for: PEFT's task_type SEQ_CLS means a classifier."""
    config = _adapter_json(adapter)
    if config.get("task_type") != "SEQ_CLS" and config.get("task") != "classification":
        return "causal-lm", None
    if not (Path(adapter) / LABELS_FILE).is_file():
        return "classification", None  # a PEFT classifier adapter: the head keeps the checkpoint's size
    return "classification", _adapter_json(adapter, LABELS_FILE)


def prompt_record_of(adapter: str | Path) -> dict | None:
    """The prompt record saved beside an adapter (see lorafit.data.prompt), or None for a folder without one."""
    path = Path(adapter) / PROMPT_FILE
    return check_record(_adapter_json(adapter, PROMPT_FILE), str(path)) if path.is_file() else None


def require_generative(adapters: list[str]) -> None:
    """ValueError, pointing to `lorafit predict`, when an adapter is a classifier: it labels text, it has no
    language-model head to generate with."""
    for path in adapters:
        if task_of(path)[0] == "classification":
            raise ValueError(f"{path}: a classifier adapter labels text, it does not generate; use "
                             f'`lorafit predict --adapter {path} "your text"` (or --input FILE)')


def adapter_name(path: str | Path, taken: list[str]) -> str:
    """A short unique name for an adapter folder: its folder name (or its parent's, for '.../adapter')."""
    path = Path(path).resolve()
    name = path.parent.name if path.name == "adapter" else path.name
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def load_with_adapters(model: str | None, adapters: list[str], task: str | None = None,
                       quantize: str = "none", quantize_embeddings: bool = False) -> tuple:
    """(model, tokenizer, adapter names): the base model (or the first adapter's base) with each adapter loaded.

    The task (and a classifier's labels) come from the first adapter unless `task` is given; `quantize` stores
    the base's block weights quantized (lorafit.quant) before the adapters go on, `quantize_embeddings` the
    embedding table too.
    """
    if model is None:
        if not adapters:
            raise ValueError("name a --model or at least one --adapter")
        model = base_model_of(adapters[0])
    labels = None
    if adapters:
        recorded, labels = task_of(adapters[0])
        task = task or recorded
    net, tokenizer = load_model(model, task=task or "causal-lm", labels=labels if task == "classification" else None,
                                quantize=quantize, quantize_embeddings=quantize_embeddings)
    names: list[str] = []
    for path in adapters:
        names.append(adapter_name(path, names))
        load_any(net, path, names[-1], alone=len(adapters) == 1)
    return net, tokenizer, names


def load_any(model: nn.Module, path: str | Path, name: str, alone: bool = True) -> None:
    """Load a LoRA adapter folder (PEFT format) or another method's folder (see lorafit.methods) onto `model`."""
    if not is_method_folder(path):
        load_adapter(model, path, name=name)
    elif not alone:
        raise ValueError(f"{path}: a {_adapter_json(path)['method']['name']} result changes the model itself; "
                         "it loads alone, not beside other adapters")
    else:
        load_method(model, path)


def render(tokenizer, messages: list[dict] | str) -> str:
    """A user message (or a whole conversation) as prompt text, through the chat template when there is one."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def prompt_ids(tokenizer, text: str, record: dict | None = None) -> list[int]:
    """Token ids of the prompt for a user's text: laid out as a training row with that input when the adapter's
    prompt `record` is given (`lorafit.data.user_prompt_ids`), else sent as one user message (`render`)."""
    if record is None:
        return tokenizer(render(tokenizer, text), add_special_tokens=False)["input_ids"]
    return user_prompt_ids(record, tokenizer, text)


class _CallbackStreamer(TextStreamer):
    """transformers' streamer, sending each finished piece of text to a callback instead of print."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.on_text(text)


def fit_context(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, log: Callable[[str], None]) -> torch.Tensor:
    """The prompt ids (1, T), cut from the left so that prompt + max_new_tokens fits the model's context.

    Past its `max_position_embeddings` a model has no trained positions: it generates garbage, with at most a
    library warning. The oldest tokens go first (in a chat, the oldest turns) and `log` says so; a budget that
    leaves no room for a prompt is a ValueError. Models without a recorded context length are not cut.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int):
        return ids
    virtual = virtual_tokens_of(model)  # prompt or prefix tuning: its tokens take context positions too
    room = context - max_new_tokens - (virtual.n if virtual is not None else 0)
    if room < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens; use at most {max_new_tokens + room - 1}")
    if ids.shape[1] > room:
        log(f"prompt truncated to {room} tokens (the model's context is {context}; {ids.shape[1]} prompt tokens "
            f"+ --max-new-tokens {max_new_tokens} did not fit): its oldest tokens were dropped")
        return ids[:, -room:]
    return ids


@torch.no_grad()
def stream(model: nn.Module, tokenizer, prompt: str | list[int], max_new_tokens: int = 128, temperature: float = 0.0,
           on_text: Callable[[str], None] | None = None, log: Callable[[str], None] | None = None) -> str:
    """Generate from rendered `prompt` (text, or its token ids), sending text to `on_text` as it comes; returns the
    whole completion.

    temperature 0 is greedy, above 0 samples. A prompt too long for the model's context is cut from the left
    (see `fit_context`) and `log` (default: a warning) says so.
    """
    if not max_new_tokens >= 1:
        raise ValueError(f"max_new_tokens (--max-new-tokens) must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature (--temperature) must be >= 0 (0: greedy), got {temperature}")
    model.eval()
    pieces: list[str] = []

    def sink(text: str) -> None:
        pieces.append(text)
        if on_text:
            on_text(text)

    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    else:
        ids = torch.tensor([prompt])
    ids = fit_context(model, ids, max_new_tokens, log or (lambda message: warnings.warn(message, stacklevel=3)))
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    generate_ids(model, enc, max_new_tokens=max_new_tokens, streamer=_CallbackStreamer(tokenizer, sink),
                 pad_token_id=tokenizer.pad_token_id, **sampling)  # with the model's virtual tokens, if any
    return "".join(pieces)
