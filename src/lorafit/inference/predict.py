"""`lorafit predict`: an adapter applied to many texts, in batches, one output row per input row.

A classifier adapter gives each text its label and the softmax probability of every class. A generative adapter
answers each text greedily, the text laid out as its training rows were (the adapter's prompt record; see
lorafit.data.prompt) unless `raw`. The rows come out as JSONL or CSV (`render_predictions`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable

from torch import nn

from ..data import DataError, Example, Row, user_prompt_ids
from .generate import load_with_adapters, prompt_ids, prompt_record_of, task_of
from .scoring import class_names, classify, generate

OUTPUT_FORMATS = ("jsonl", "csv")


def text_rows(texts: list[str]) -> list[Row]:
    """Texts given on the command line as input rows."""
    return [Row({"text": text}, "argument", i) for i, text in enumerate(texts, 1)]


def predict(adapter: str, rows: list[Row], model: str | None = None, raw: bool = False, batch_size: int = 16,
            max_new_tokens: int = 64, quantize: str = "none", log: Callable[[str], None] = print) -> list[dict]:
    """The adapter's output for every input row (a `text` field, or `instruction` and `input`): a classifier's
    label and class probabilities, or a generative adapter's greedy answer. Loads the adapter's base model unless
    `model` names one."""
    if not rows:
        raise DataError("nothing to predict: give texts as arguments or --input FILE")
    net, tokenizer, _ = load_with_adapters(model, [adapter], quantize=quantize)
    if task_of(adapter)[0] == "classification":
        return classify_rows(net, tokenizer, rows, batch_size)
    record = None if raw else prompt_record_of(adapter)
    if record is None and not raw:
        log(f"{adapter}: no prompt record saved with the adapter; each text is sent as it is")
    return generate_rows(net, tokenizer, rows, record, batch_size, max_new_tokens)


def _token_limit(model: nn.Module, tokenizer) -> int:
    """The longest input the classifier takes: its position table, or the tokenizer's limit if shorter."""
    limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    return min(n for n in limits if isinstance(n, int) and n > 0)


def classify_rows(model: nn.Module, tokenizer, rows: list[Row], batch_size: int) -> list[dict]:
    """{text, label, probabilities: {class: p}} per row; texts longer than the model takes are cut at its end."""
    if any("text" not in row.fields for row in rows):
        row = next(row for row in rows if "text" not in row.fields)
        raise DataError(f"{row.where}: a classifier labels a 'text' field; this row has {', '.join(row.fields)}")
    texts = [row.fields["text"] for row in rows]
    limit = _token_limit(model, tokenizer)
    examples = [Example(tokenizer(text, truncation=True, max_length=limit)["input_ids"], 0) for text in texts]
    predicted, probabilities = classify(model, examples, batch_size, tokenizer.pad_token_id)
    names = class_names(model, probabilities.shape[1])
    return [{"text": text, "label": names[p], "probabilities": dict(zip(names, [round(x, 6) for x in probs.tolist()],
                                                                             strict=True))}
            for text, p, probs in zip(texts, predicted.tolist(), probabilities, strict=True)]


def row_prompt_ids(tokenizer, row: Row, record: dict | None) -> list[int]:
    """Token ids of one input row's prompt: through the prompt record when there is one, else as one message."""
    text, instruction = row.fields.get("text", row.fields.get("input", "")), row.fields.get("instruction")
    if record is not None:
        return user_prompt_ids(record, tokenizer, text, instruction, row.source, row.line)
    user = text if instruction is None else instruction + (f"\n\n{text}" if text.strip() else "")
    return prompt_ids(tokenizer, user)


def generate_rows(model: nn.Module, tokenizer, rows: list[Row], record: dict | None, batch_size: int,
                  max_new_tokens: int) -> list[dict]:
    """The input fields of each row plus `output`, its greedy answer (left-padded batches)."""
    if not hasattr(model, "generate"):
        raise DataError(f"{type(model).__name__} does not generate text; pass a generative adapter or --model")
    prompts = [row_prompt_ids(tokenizer, row, record) for row in rows]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [{**row.fields, "output": output} for row, output in zip(rows, outputs, strict=True)]


def output_format(fmt: str | None, output: str | None) -> str:
    """The format asked for, else the output file's suffix (.csv), else JSONL."""
    if fmt is None:
        return "csv" if output and str(output).lower().endswith(".csv") else "jsonl"
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    return fmt


def render_predictions(records: list[dict], fmt: str) -> str:
    """JSONL (one object per row) or CSV (one column per field; a classifier's probabilities as `p(<class>)`)."""
    if fmt == "jsonl":
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    flat = [{**{k: v for k, v in r.items() if k != "probabilities"},
             **{f"p({name})": p for name, p in r.get("probabilities", {}).items()}} for r in records]
    columns = list(dict.fromkeys(key for row in flat for key in row)) or ["text"]  # rows may differ (text / input)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()
