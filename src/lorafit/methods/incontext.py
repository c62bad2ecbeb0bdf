"""The in-context baseline: k training examples in the prompt, no training (the "few-shot vs fine-tuning" table).

Every validation question is asked after the same k solved examples drawn from the training split, as earlier
turns of one conversation (user question, assistant answer, ...). Scored by exact match like a trained adapter.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from torch import nn

from ..data import Row
from ..data.encode import instruction_messages
from ..evaluate import exact_match, generate, normalize
from .select import MethodError


def _messages(row: Row, fmt: str) -> list[dict]:
    """The row as alternating user / assistant turns."""
    if fmt == "instruction":
        return instruction_messages(row)
    if fmt == "chat":
        return [m for m in row.fields["messages"] if m["role"] in ("user", "assistant")]
    raise MethodError(f"in-context: needs instruction or chat rows (a generation task), got {fmt} rows")


def few_shot_prompts(rows: list[Row], shots: list[Row], fmt: str, tokenizer) -> list[tuple[str, str]]:
    """(prompt, reference answer) per row: the shots' turns, then the row's question, rendered by the template."""
    if not getattr(tokenizer, "chat_template", None):
        raise MethodError("in-context: the tokenizer has no chat template to lay out the examples as turns")
    context = [m for shot in shots for m in _messages(shot, fmt)]
    pairs = []
    for row in rows:
        turns = _messages(row, fmt)
        last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(context + turns[:last], tokenize=False, add_generation_prompt=True)
        pairs.append((prompt, turns[last]["content"]))
    return pairs


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
