"""Scoring a model on a validation split: loss / perplexity, exact match of greedy generations, accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .data import Example, Row, collate, prompt_and_answer
from .loss import loss_of
from .methods.virtual import virtual_inputs


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def mean_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean per-example-batch loss as the model computes it (token cross-entropy for LMs, CE for classifiers)."""
    model.eval()
    losses, weights = [], []
    for chunk in _chunks(examples, batch_size):
        batch = collate(chunk, pad_id)
        losses.append(loss_of(model, batch).item())
        weights.append(len(chunk))
    return sum(loss * n for loss, n in zip(losses, weights)) / max(1, sum(weights))


@torch.no_grad()
def accuracy(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Share of examples whose arg-max class is the label, in percent."""
    model.eval()
    right = 0
    for chunk in _chunks(examples, batch_size):
        batch = collate(chunk, pad_id)
        inputs, _ = virtual_inputs(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        logits = model(**inputs).logits  # (B, C)
        right += (logits.argmax(-1).cpu() == batch["labels"]).sum().item()
    return 100.0 * right / max(1, len(examples))


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
             streamer=None) -> list[str]:
    """Greedy completions of already-rendered prompts (left-padded batches); returns only the new text.

    Virtual tokens go in front of the left padding (see `generate_ids`), so every prompt's real tokens start at
    position n, as in training.
    """
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from the right edge
    outputs = []
    try:
        for chunk in _chunks(prompts, batch_size):
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            new = generate_ids(model, dict(enc), max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                               pad_token_id=tokenizer.pad_token_id)  # (B, new)
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def generate_ids(model: nn.Module, enc: dict, **kwargs) -> torch.Tensor:
    """model.generate on tokenized prompts `enc` (input_ids, attention_mask) with the model's virtual tokens put
    in (see lorafit.methods.virtual); returns only the new tokens (B, new).

    A prompt-tuned model generates from inputs_embeds, and then transformers returns only the new tokens; a
    prefix goes in as the starting key/value cache, and the output repeats the prompt ids first.
    """
    inputs, _ = virtual_inputs(model, enc)
    ids = model.generate(**inputs, **kwargs)  # (B, T + new), or (B, new) from inputs_embeds
    return ids[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else ids


def normalize(text: str) -> str:
    """Exact match compares answers case-folded, with surrounding whitespace and a final period removed."""
    return text.strip().rstrip(".").strip().casefold()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after `normalize`, in percent."""
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return 100.0 * hits / max(1, len(references))


def score(model: nn.Module, tokenizer, metric: str, rows: list[Row], examples: list[Example], fmt: str,
          batch_size: int, max_new_tokens: int, log: Callable[[str], None] = print) -> dict:
    """The run's metric on the validation rows, plus the loss; samples of (prompt, answer, prediction) too."""
    pad_id = tokenizer.pad_token_id
    result = {"metric": metric, "loss": mean_loss(model, examples, batch_size, pad_id)}
    if metric == "loss":
        result["value"] = result["loss"]
        result["perplexity"] = math.exp(min(result["loss"], 50))
    elif metric == "accuracy":
        result["value"] = accuracy(model, examples, batch_size, pad_id)
    else:
        pairs = [prompt_and_answer(row, fmt, tokenizer) for row in rows]
        predictions = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
        result["value"] = exact_match(predictions, [a for _, a in pairs])
        result["samples"] = [{"prompt": p, "answer": a, "prediction": pred}
                             for (p, a), pred in zip(pairs, predictions)]
    log(f"{metric}: {result['value']:.2f} (loss {result['loss']:.4f}) on {len(examples)} validation rows")
    return result


def evaluate_adapters(cfg, adapters: list[str], with_base: bool, log: Callable[[str], None] = print) -> list[dict]:
    """`lorafit eval`: the run config's metric for the base model (optional) and each adapter, one row each."""
    from .adapter_io import load_adapter
    from .data import encode, label_set, load_splits
    from .generate import adapter_name
    from .methods import is_method_folder, load_method
    from .models import load_model
    from .train import pick_metric

    train_rows, val_rows, fmt = load_splits(cfg.data, seed=cfg.train.seed, log=log)
    labels = label_set(train_rows, val_rows) if cfg.model.task == "classification" else None
    def load() -> tuple:  # the base as training loaded it (quantized the same way)
        return load_model(cfg.model.name, task=cfg.model.task, labels=labels, quantize=cfg.model.quantize,
                          quantize_head=cfg.model.quantize_head, quantize_embeddings=cfg.model.quantize_embeddings)

    model, tokenizer = load()
    rows = val_rows[:cfg.eval.limit]
    examples = encode(rows, fmt, tokenizer, cfg.data, labels)
    metric = pick_metric(cfg, fmt)
    run = lambda net: score(net, tokenizer, metric, rows, examples, fmt, cfg.eval.batch_size,  # noqa: E731
                            cfg.eval.max_new_tokens, log)
    results = [{"name": "base", **run(model)}] if with_base else []  # before any adapter (heads load in place)
    names: list[str] = []
    for path in adapters:
        names.append(adapter_name(path, names))
        if is_method_folder(path):  # another method changes the model itself: score it on its own copy
            own, _ = load()
            load_method(own, path)
            results.append({"name": names[-1], **run(own)})
        else:
            load_adapter(model, path, name=names[-1])
            results.append({"name": names[-1], **run(model)})
    return results
