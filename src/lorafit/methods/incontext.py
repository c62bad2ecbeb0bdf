"""The in-context baseline: k training examples in the prompt, no training (the "few-shot vs fine-tuning" table).

Every validation question is asked after the same k solved examples drawn from the training split, as earlier
turns of one conversation (user question, assistant answer, ...). Scored by exact match like a trained adapter
(lorafit.inference.scoring.in_context_score); this file builds the prompts.
"""

from __future__ import annotations

from ..data import Row
from ..data.encode import instruction_messages
from .registry import Method, MethodError, register


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


register(Method("in-context", "no training: k solved examples in each prompt",
                setup=lambda model, options, lora: model.requires_grad_(False), trains=False))
