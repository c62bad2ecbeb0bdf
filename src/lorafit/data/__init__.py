"""Supervised fine-tuning data: read rows, render prompts, tokenize with prompt masking, pack, batch.

Formats (one JSON object per JSONL line, one CSV row under a header, or one Parquet row per example):
  instruction     {"instruction", "input" (optional), "output"}  Alpaca style
  chat            {"messages": [{"role", "content"}, ...]}       needs a tokenizer with a chat template
  text            {"text"}                                       plain LM, the loss sees every token
  classification  {"text", "label"}                              label: a string (ints are read as strings)
  auto            detected from the first readable row's fields

Rendering. Instruction rows go through the tokenizer's own chat template when it has one (user = instruction,
plus "\\n\\n" + input when input is non-empty; assistant = output), else through the Alpaca text template
(`ALPACA_PROMPT`). Chat rows always use the chat template.
The adapter keeps a record of this layout (`prompt.py`), so that generating
lays a user's text out as a training row with that input would be.

Masking (`mask_prompt=True`). Only assistant tokens carry labels; everything else gets -100 (`IGNORE`). For chat
rows every assistant turn trains, not just the last. Each turn's characters are found by rendering the
conversation up to the turn with the generation prompt and up to the end of the turn, checking that each rendering
starts with the one before it (DataError otherwise), then tokenizing those prefixes: their token counts are
the label boundaries, so the prompt tokens at training are exactly the ids `prompt_ids` gives at generation.

EOS. An answer must end with the tokenizer's eos token so the model learns to stop. ChatML templates such as
SmolLM2's already close a turn with `<|im_end|>`, which is that tokenizer's eos: then the turn trains up to
and including it, the "\\n" after it stays masked, and no second eos is added. When the rendered turn does not
contain the eos string (Alpaca, `text` rows, templates whose end-of-turn differs from eos), one eos id is appended
after the final answer. A tokenizer without an eos token gets none.

Overflow (a sequence longer than `max_length`). "error" raises DataError naming the file, line and length.
"truncate" keeps the last `max_length` tokens of instruction and chat rows (the start of the prompt, or the
oldest turns, go first: the answer and its eos, the tokens the loss sees, survive) and the first `max_length`
tokens of text rows; classification uses the tokenizer's right truncation, which keeps its special tokens.

Packing (causal LM only). Examples are concatenated in order, labels alongside their tokens, and cut into rows
of exactly `max_length` tokens; the tail shorter than a row is dropped (kept if it is the only row). Tokens
attend across example boundaries inside a row, as in common LM packing. Packed examples are not truncated: one
longer than `max_length` runs on into the next row (overflow="error" still rejects it).
"""

from .batch import batches, collate, to_device
from .encode import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE, Example, encode, pack, prompt_and_answer, prompt_ids
from .prompt import PROMPT_FILE, prompt_record, user_messages, user_prompt_ids
from .rows import FORMATS, REQUIRED, DataConfig, DataError, Row, Rows, label_set, load_splits, read_inputs, read_rows

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "FORMATS", "IGNORE", "PROMPT_FILE", "REQUIRED", "DataConfig",
    "DataError", "Example", "Row", "Rows", "batches", "collate", "encode", "label_set", "load_splits", "pack",
    "prompt_and_answer", "prompt_ids", "prompt_record", "read_inputs", "read_rows", "to_device", "user_messages",
    "user_prompt_ids",
]  # fmt: skip
