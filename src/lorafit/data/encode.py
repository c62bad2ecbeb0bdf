"""Rows to token ids: render with the chat template (or Alpaca), mask the prompt, add eos, truncate, pack.

See the package docstring (`lorafit.data`) for the rules this module implements.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rows import FORMATS, DataConfig, DataError, Row

IGNORE = -100  # label of a token the loss skips (ignore_index of torch's cross_entropy)
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class Example:
    """One tokenized example."""

    input_ids: list[int]  # token ids, at most max_length (exactly max_length when packed)
    labels: list[int] | int  # LM: one label per token, IGNORE where the loss skips; classification: class index


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict], generation: bool, row: Row) -> str:
    if not _has_template(tokenizer):
        raise DataError(f"{row.where}: chat rows need a tokenizer with a chat template; this one has none "
                        "(use instruction or text rows, or set tokenizer.chat_template)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as err:  # jinja2 raises TemplateError (e.g. "roles must alternate") and others
        raise DataError(f"{row.where}: the tokenizer's chat template rejects this conversation ({err})") from None


def instruction_messages(row: Row) -> list[dict]:
    """The instruction row as a user turn and an assistant turn."""
    user = row.fields["instruction"] + (f"\n\n{row.fields['input']}" if row.fields["input"].strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row.fields["output"]}]


def _alpaca(row: Row) -> str:
    template = ALPACA_PROMPT if row.fields["input"].strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=row.fields["instruction"], input=row.fields["input"])


def _bos(tokenizer) -> list[int]:
    """[bos] when the tokenizer puts bos before plain text itself (Llama does; GPT-2 and Qwen do not)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plain_ids(tokenizer, text: str) -> list[int]:
    """Token ids of plain text as a `text` row starts: bos first when the tokenizer puts one there, no eos."""
    return _bos(tokenizer) + _ids(tokenizer, text)


def prompt_and_answer(row: Row, fmt: str, tokenizer) -> tuple[str, str]:
    """The prompt to generate from (ending with the generation prompt) and the reference answer.

    Instruction: the user turn (or the Alpaca prompt) and `output`. Chat: the conversation before its last
    assistant turn and that turn's content. Classification: the text and its label. For exact-match evaluation;
    tokenize the prompt with `prompt_ids`, which matches how `encode` tokenized it.
    """
    if fmt == "instruction":
        prompt = _render(tokenizer, instruction_messages(row)[:1], True, row) if _has_template(tokenizer) \
            else _alpaca(row)
        return prompt, row.fields["output"]
    if fmt == "chat":
        messages = row.fields["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return _render(tokenizer, messages[:last], True, row), messages[last]["content"]
    if fmt == "classification":
        return row.fields["text"], row.fields["label"]
    raise DataError(f"{row.where}: format {fmt!r} has no prompt and answer; use instruction or chat rows")


def prompt_ids(row: Row, fmt: str, tokenizer) -> list[int]:
    """Token ids of `prompt_and_answer`'s prompt, exactly as `encode` tokenized them (bos included)."""
    prompt, _ = prompt_and_answer(row, fmt, tokenizer)
    return (_bos(tokenizer) if not _has_template(tokenizer) else []) + _ids(tokenizer, prompt)


def _turn_spans(row: Row, messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn (through its eos if any)."""
    full = _render(tokenizer, messages, False, row)
    eos, spans = tokenizer.eos_token, []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, row)
        upto = _render(tokenizer, messages[: i + 1], False, row)
        for head, whole in ((before, upto), (upto, full)):
            if not whole.startswith(head):
                at = next((k for k, (a, b) in enumerate(zip(head, whole, strict=False)) if a != b), len(whole))
                raise DataError(f"{row.where}: the chat template renders turn {i} differently when later turns "
                                f"follow (at character {at}: {head[at:at + 30]!r} vs {whole[at:at + 30]!r}), so "
                                "prompt and answer tokens cannot be told apart; use a template that only appends")
        turn = upto[len(before):]
        end = turn.rfind(eos) + len(eos) if eos and eos in turn else len(turn.rstrip())
        spans.append((len(before), len(before) + end))
    return full, spans


def _token_cut(tokenizer, text: str, ids: list[int], offsets: list | None, cut: int, row: Row) -> int:
    """How many tokens of `text` (tokenized as `ids`) lie before character `cut`.

    Tokenizing text[:cut] must give a prefix of `ids` (then training sees the same prompt ids as generation);
    if a token straddles the cut, the fast tokenizer's offsets decide (the straddling token goes before the cut).
    """
    head = _ids(tokenizer, text[:cut])
    if ids[: len(head)] == head:
        return len(head)
    if offsets is not None:
        return sum(1 for start, _ in offsets if start < cut)
    raise DataError(f"{row.where}: a token straddles the prompt/answer boundary at character {cut}; use a fast "
                    "tokenizer (offsets decide then) or end the prompt with whitespace or a newline")


def _lm_tokens(row: Row, fmt: str, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of an LM row and, per token, whether it is answer (trained with mask_prompt)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        ids = plain_ids(tokenizer, row.fields["text"]) + eos
        return ids, [True] * len(ids)
    if _has_template(tokenizer):
        messages = row.fields["messages"] if fmt == "chat" else instruction_messages(row)
        text, spans = _turn_spans(row, messages, tokenizer)
        prefix = []  # the chat template writes bos itself when the model wants one
    elif fmt == "chat":
        raise DataError(f"{row.where}: chat rows need a tokenizer with a chat template; this one has none "
                        "(use instruction or text rows, or set tokenizer.chat_template)")
    else:
        prompt = _alpaca(row)
        text = prompt + row.fields["output"]
        spans = [(len(prompt), len(text))]
        prefix = _bos(tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
    ids, offsets = enc["input_ids"], enc.get("offset_mapping")
    answer = [False] * len(ids)
    for start, end in spans:
        lo, hi = (_token_cut(tokenizer, text, ids, offsets, c, row) for c in (start, end))
        answer[lo:hi] = [True] * (hi - lo)
    closes_with_answer = fmt == "instruction" or row.fields["messages"][-1]["role"] == "assistant"
    if closes_with_answer and not (tokenizer.eos_token and tokenizer.eos_token in text[spans[-1][0]: spans[-1][1]]):
        ids, answer = ids + eos, answer + [True] * len(eos)
    return prefix + ids, [False] * len(prefix) + answer


def _encode_lm(row: Row, fmt: str, tokenizer, cfg: DataConfig) -> Example:
    ids, answer = _lm_tokens(row, fmt, tokenizer)
    labels = [t if keep or not cfg.mask_prompt else IGNORE for t, keep in zip(ids, answer, strict=True)]
    if len(ids) > cfg.max_length:
        if cfg.overflow == "error":
            raise DataError(f"{row.where}: {len(ids)} tokens, more than max_length={cfg.max_length}; raise "
                            "--data.max_length, shorten the row, or pass --data.overflow truncate "
                            "(overflow='truncate' in Python)")
        if not cfg.packing:  # packed, a long example simply runs on into the next row
            keep = slice(0, cfg.max_length) if fmt == "text" else slice(len(ids) - cfg.max_length, None)
            ids, labels = ids[keep], labels[keep]
    return Example(ids, labels)


def _encode_class(row: Row, tokenizer, cfg: DataConfig, index: dict[str, int]) -> Example:
    if row.fields["label"] not in index:
        raise DataError(f"{row.where}: label {row.fields['label']!r} is not one of the {len(index)} known labels")
    truncate = cfg.overflow == "truncate"
    ids = tokenizer(row.fields["text"], truncation=truncate, max_length=cfg.max_length if truncate else None)
    ids = ids["input_ids"]
    if len(ids) > cfg.max_length:
        raise DataError(f"{row.where}: {len(ids)} tokens, more than max_length={cfg.max_length}; raise "
                        "--data.max_length, shorten the text, or pass --data.overflow truncate "
                        "(overflow='truncate' in Python)")
    return Example(ids, index[row.fields["label"]])


def encode(rows: list[Row], fmt: str, tokenizer, cfg: DataConfig, labels: list[str] | None = None) -> list[Example]:
    """Tokenize rows into Examples: LM rows with per-token labels (prompt masked), classification rows with a
    class index into `labels` (from `label_set`). Packs LM examples when `cfg.packing`. See the module docstring
    for rendering, masking, eos and truncation."""
    if fmt == "classification":
        if labels is None:
            raise ValueError("classification rows need labels=label_set(train, val) to map labels to indices")
        if cfg.packing:
            raise DataError("data.packing applies to causal LM formats, not classification; drop --data.packing "
                            "(packing=False in Python)")
        index = {label: i for i, label in enumerate(labels)}
        return [_encode_class(row, tokenizer, cfg, index) for row in rows]
    if fmt not in FORMATS:
        raise DataError(f"format must be one of {FORMATS}, got {fmt!r} (read_rows returns the detected one)")
    examples = [_encode_lm(row, fmt, tokenizer, cfg) for row in rows]
    return pack(examples, cfg.max_length) if cfg.packing else examples


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate LM examples in order into rows of exactly `max_length` tokens, labels kept beside their tokens.

    The tail shorter than a row is dropped, unless it is all there is. The first label of a row needs no care:
    a causal LM's loss predicts token t+1 from position t, so label 0 is never used.
    """
    ids = [t for e in examples for t in e.input_ids]  # (N,) the whole stream
    labels = [t for e in examples for t in e.labels]  # (N,) aligned with ids
    rows = len(ids) // max_length
    if rows == 0:
        return [Example(ids, labels)] if ids else []
    return [Example(ids[i * max_length:(i + 1) * max_length], labels[i * max_length:(i + 1) * max_length])
            for i in range(rows)]
