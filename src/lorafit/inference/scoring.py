"""Scoring a model on a validation split: loss / perplexity, exact match of greedy generations, accuracy (with
per-class precision, recall and F1, the confusion matrix and every prediction).

The loss is the model's own unless the caller passes another function of (model, batch): training passes its
chunked loss, so the validation loss it reports is computed the way it trains.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn

from ..data import Example, Row, collate, prompt_and_answer
from ..methods import model_inputs
from ..methods.incontext import few_shot_prompts
from ..methods.registry import MethodError

LossFn = Callable[[nn.Module, dict], torch.Tensor]  # (model, batch) -> mean loss of the batch


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss as the model computes it (token cross-entropy for language models, CE for classifiers)."""
    return model(**model_inputs(model, batch)[0]).loss


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def mean_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
              loss: LossFn = model_loss) -> float:
    """Mean per-example-batch loss (token cross-entropy for LMs, CE for classifiers), by `loss`."""
    model.eval()
    losses, weights = [], []
    for chunk in _chunks(examples, batch_size):
        batch = collate(chunk, pad_id)
        losses.append(loss(model, batch).item())
        weights.append(len(chunk))
    return sum(loss * n for loss, n in zip(losses, weights)) / max(1, sum(weights))


@torch.no_grad()
def classify(model: nn.Module, examples: list[Example], batch_size: int,
             pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(arg-max class (N,), softmax class probabilities (N, C)) of classification examples, in their order."""
    model.eval()
    predicted, probabilities = [], []
    for chunk in _chunks(examples, batch_size):
        batch = collate(chunk, pad_id)
        inputs, _ = model_inputs(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        logits = model(**inputs).logits  # (B, C)
        predicted.append(logits.argmax(-1).cpu())
        probabilities.append(logits.float().softmax(-1).cpu())
    return torch.cat(predicted), torch.cat(probabilities)


def accuracy(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Share of examples whose arg-max class is the label, in percent."""
    predicted, _ = classify(model, examples, batch_size, pad_id)
    return 100.0 * (predicted == torch.tensor([e.labels for e in examples])).sum().item() / max(1, len(examples))


def class_names(model: nn.Module, n: int) -> list[str]:
    """The model's class names in index order (config.id2label, which `load_model` sets from labels.json)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    return [str(id2label.get(i, i)) for i in range(n)]


def class_scores(model: nn.Module, rows: list[Row], examples: list[Example], batch_size: int, pad_id: int) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, the confusion matrix (rows: true class, columns:
    predicted) and every prediction with its class probabilities, for classification rows."""
    predicted, probabilities = classify(model, examples, batch_size, pad_id)
    names = class_names(model, probabilities.shape[1])
    truth, guess = [e.labels for e in examples], predicted.tolist()
    classes = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, guess, labels=classes, zero_division=0)
    per_class = {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                 for name, p, r, f, n in zip(names, precision, recall, f1, support, strict=True)}
    predictions = [{"text": row.fields["text"], "label": row.fields["label"], "prediction": names[g],
                    "probabilities": {name: round(p, 6) for name, p in zip(names, probs.tolist(), strict=True)}}
                   for row, g, probs in zip(rows, guess, probabilities, strict=True)]
    return {"value": 100.0 * sum(t == g for t, g in zip(truth, guess)) / max(1, len(truth)), "per_class": per_class,
            "confusion": confusion_matrix(truth, guess, labels=classes).tolist(), "predictions": predictions}


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str] | list[list[int]], max_new_tokens: int,
             batch_size: int = 16, streamer=None) -> list[str]:
    """Greedy completions of already-rendered prompts, as text or token ids (left-padded batches); returns only the
    new text.

    Virtual tokens go in front of the left padding (see `generate_ids`), so every prompt's real tokens start at
    position n, as in training.
    """
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from the right edge
    outputs = []
    try:
        for chunk in _chunks(prompts, batch_size):
            enc = tokenizer.pad({"input_ids": chunk}, return_tensors="pt") if isinstance(chunk[0], list) \
                else tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
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
    inputs, _ = model_inputs(model, enc)
    # synced_gpus off: under torch.distributed with an FSDP-sharded model, transformers would otherwise make every
    # step wait for the other processes, and lorafit generates on one process (rank 0) with whole weights
    ids = model.generate(**inputs, synced_gpus=False, **kwargs)  # (B, T + new), or (B, new) from inputs_embeds
    return ids[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else ids


def normalize(text: str) -> str:
    """Exact match compares answers case-folded, with surrounding whitespace and a final period removed."""
    return text.strip().rstrip(".").strip().casefold()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after `normalize`, in percent."""
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return 100.0 * hits / max(1, len(references))


def pick_metric(requested: str, task: str, fmt: str) -> str:
    """The metric "auto" stands for: exact_match for instruction/chat data, accuracy for classification, loss for
    plain text; any other request is taken as it is."""
    if requested != "auto":
        return requested
    if task == "classification":
        return "accuracy"
    return "exact_match" if fmt in ("instruction", "chat") else "loss"


def score(model: nn.Module, tokenizer, metric: str, rows: list[Row], examples: list[Example], fmt: str,
          batch_size: int, max_new_tokens: int, log: Callable[[str], None] = print, loss: LossFn = model_loss) -> dict:
    """The run's metric on the validation rows, plus the loss; samples of (prompt, answer, prediction) too."""
    pad_id = tokenizer.pad_token_id
    result = {"metric": metric, "loss": mean_loss(model, examples, batch_size, pad_id, loss)}
    if metric == "loss":
        result["value"] = result["loss"]
        result["perplexity"] = math.exp(min(result["loss"], 50))
    elif metric == "accuracy":
        result.update(class_scores(model, rows, examples, batch_size, pad_id))
    else:
        pairs = [prompt_and_answer(row, fmt, tokenizer) for row in rows]
        predictions = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
        result["value"] = exact_match(predictions, [a for _, a in pairs])
        result["samples"] = [{"prompt": p, "answer": a, "prediction": pred}
                             for (p, a), pred in zip(pairs, predictions)]
    log(f"{metric}: {result['value']:.2f} (loss {result['loss']:.4f}) on {len(examples)} validation rows")
    return result


def in_context_score(model: nn.Module, tokenizer, rows: list[Row], train_rows: list[Row], fmt: str, k: int,
                     batch_size: int, max_new_tokens: int, seed: int = 0,
                     log: Callable[[str], None] = print) -> dict:
    """Exact match of the frozen model with `k` training examples in every prompt."""
    if k > len(train_rows):
        raise MethodError(f"in-context: shots={k} but the training split has {len(train_rows)} rows")
    shots = random.Random(seed).sample(list(train_rows), k)
    pairs = few_shot_prompts(rows, shots, fmt, tokenizer)
    predictions = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
    value = exact_match(predictions, [a for _, a in pairs])
    log(f"exact_match with {k} examples in the prompt: {value:.2f} on {len(rows)} validation rows")
    samples = [{"prompt": p, "answer": a, "prediction": pred, "hit": normalize(a) == normalize(pred)}
               for (p, a), pred in zip(pairs, predictions)]
    return {"metric": "exact_match", "value": value, "shots": k, "samples": samples[:20]}
