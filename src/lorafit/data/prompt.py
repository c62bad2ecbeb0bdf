"""The prompt format an adapter was trained with, and a user's text laid out in it.

Training lays every row out in one way (`encode`): instruction rows through the chat template or the Alpaca text,
chat rows through the chat template, text and classification rows as they are. An adapter learns that layout, and
the instruction its rows share, if they share one: a topic adapter trained on rows whose `instruction` is always
"Which topic is this?" and whose `input` is the text answers a bare question badly. So the training recipe saves
a small record of the layout beside the adapter (`PROMPT_FILE`, which PEFT ignores), and `lorafit generate`,
`chat` and `predict` lay a user's text out as a training row with that text as its input would be:

    {"version": 1, "format": "instruction", "layout": "chat_template" | "alpaca" | "plain",
     "instruction": the instruction every row shares (its inputs vary), or null,
     "system": the system prompt every chat row starts with, or null}
"""

from __future__ import annotations

from .encode import instruction_messages, plain_ids, prompt_and_answer, prompt_ids
from .rows import FORMATS, DataError, Row

PROMPT_FILE = "lorafit_prompt.json"  # lorafit's own side file of an adapter folder (PEFT ignores it)
LAYOUTS = ("chat_template", "alpaca", "plain")
VERSION = 1


def layout_of(fmt: str, tokenizer) -> str:
    """How `encode` lays out rows of `fmt` with this tokenizer: its chat template, the Alpaca text, or plain text."""
    if fmt == "chat" or (fmt == "instruction" and getattr(tokenizer, "chat_template", None)):
        return "chat_template"
    return "alpaca" if fmt == "instruction" else "plain"


def _shared(values: list[str]) -> str | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def prompt_record(rows: list[Row], fmt: str, tokenizer) -> dict:
    """The record of how the training rows were laid out (see the module docstring).

    An instruction counts as shared when every row has it and the inputs differ: then the input is the part a
    user supplies. A system prompt counts as shared when every chat row starts with that same system turn.
    """
    if fmt not in FORMATS:
        raise DataError(f"format must be one of {FORMATS}, got {fmt!r}")
    record = {"version": VERSION, "format": fmt, "layout": layout_of(fmt, tokenizer), "instruction": None,
              "system": None}
    if fmt == "instruction" and len({r.fields["input"] for r in rows}) > 1:
        record["instruction"] = _shared([r.fields["instruction"] for r in rows])
    if fmt == "chat":
        firsts = [r.fields["messages"][0] for r in rows]
        if all(m["role"] == "system" for m in firsts):
            record["system"] = _shared([m["content"] for m in firsts])
    return record


def check_record(record: object, source: str) -> dict:
    """`record` read from `source` (a prompt file), if it is one this version understands; else DataError."""
    if not isinstance(record, dict) or record.get("format") not in FORMATS or record.get("layout") not in LAYOUTS:
        raise DataError(f"{source}: not a prompt record (needs format in {FORMATS} and layout in {LAYOUTS}); "
                        "delete the file to send text as it is, or pass --raw")
    for key in ("instruction", "system"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise DataError(f"{source}: {key} must be a string or null, got {record[key]!r:.60}")
    return record


def user_row(record: dict, text: str, instruction: str | None = None, source: str = "your text",
             line: int = 0) -> Row:
    """The training row a user's text stands for: with a shared instruction the text is the row's `input`,
    without one it is the `instruction` (or the user turn after the shared system prompt). An explicit
    `instruction` (an input file's row) takes the place of the shared one."""
    fmt = record["format"]
    if fmt == "instruction":
        shared = instruction if instruction is not None else record.get("instruction")
        fields = {"instruction": shared, "input": text} if shared is not None else {"instruction": text, "input": ""}
        return Row({**fields, "output": ""}, source, line)
    if instruction is not None:  # as an instruction row's user turn reads: instruction, blank line, input
        text = instruction + (f"\n\n{text}" if text.strip() else "")
    if fmt == "chat":
        system = [{"role": "system", "content": record["system"]}] if record.get("system") is not None else []
        turns = [*system, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        return Row({"messages": turns}, source, line)
    return Row({"text": text, "label": ""} if fmt == "classification" else {"text": text}, source, line)


def _check_layout(record: dict, tokenizer, where: str) -> None:
    now = layout_of(record["format"], tokenizer)
    if now != record["layout"]:
        raise DataError(f"{where}: the adapter was trained with the {record['layout']} prompt layout, but this "
                        f"tokenizer gives the {now} layout (a different --model?); use the adapter's base model, "
                        "or pass --raw to send the text as it is")


def user_prompt_ids(record: dict, tokenizer, text: str, instruction: str | None = None, source: str = "your text",
                    line: int = 0) -> list[int]:
    """Token ids of the prompt a user's text gets: those of a training row with that text as its input, up to
    where the answer starts, exactly as `encode` tokenized them (see `user_row`)."""
    row = user_row(record, text, instruction, source, line)
    _check_layout(record, tokenizer, row.where)
    if record["format"] == "text":
        return plain_ids(tokenizer, text)
    if record["format"] == "classification":
        return tokenizer(text)["input_ids"]
    return prompt_ids(row, record["format"], tokenizer)


def user_messages(record: dict, tokenizer, text: str) -> list[dict]:
    """The conversation a chat starts with for a user's first line: the training layout's turns (system prompt,
    user turn), or for the Alpaca and plain layouts one user turn holding the whole laid-out prompt text."""
    row = user_row(record, text)
    _check_layout(record, tokenizer, row.where)
    if record["layout"] == "chat_template":
        return row.fields["messages"][:-1] if record["format"] == "chat" else instruction_messages(row)[:1]
    prompt = prompt_and_answer(row, record["format"], tokenizer)[0] if record["format"] == "instruction" else text
    return [{"role": "user", "content": prompt}]
