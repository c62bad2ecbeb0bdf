"""The tokenizer of a GGUF file llama.cpp runs: its `tokenizer.*` metadata, built from a Hugging Face tokenizer or
copied from the GGUF file the model came from.

llama.cpp tokenizes by itself from this metadata, so it must say exactly what the Hugging Face tokenizer does:
the vocabulary by id with each token's type, the BPE merges in rank order, the special token ids, whether a BOS is
prepended, and the pre-tokenizer (the regex that splits text before BPE), which llama.cpp knows by name only.
Byte-level BPE (GPT-2, SmolLM2, Llama 3) is what can be built here; SentencePiece and WordPiece vocabularies are
refused. A model that came from a .gguf file keeps that file's own tokenizer metadata, copied field by field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .presets import ModelError

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # llama.cpp's token types (gguf TokenType)


@dataclass(frozen=True)
class Field:
    """One GGUF metadata entry: key, value, GGUF value type, and the element type of an array."""

    key: str
    value: object
    vtype: object  # gguf.GGUFValueType
    sub_type: object = None  # gguf.GGUFValueType of an array's elements


def copied_tokenizer_fields(path: str | Path) -> list[Field]:
    """Every `tokenizer.*` field of GGUF file `path`, as it is stored: the original model's own tokenizer."""
    from gguf import GGUFReader, GGUFValueType  # only GGUF export needs it

    fields = []
    for key, field in GGUFReader(str(path)).fields.items():
        if not key.startswith("tokenizer."):
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        fields.append(Field(key, field.contents(), field.types[0], sub))
    if not any(f.key == "tokenizer.ggml.model" for f in fields):
        raise ModelError(f"{path}: has no tokenizer.ggml.model; a GGUF file without its tokenizer cannot be copied")
    return fields


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer (tokenizer.json's "pre_tokenizer"), or ModelError.

    llama.cpp's converter recognises pre-tokenizers by hashing a test tokenization; here the two layouts byte-level
    BPE models use are recognised by their structure: ByteLevel with GPT-2's regex alone ("gpt-2"), and digits split
    one by one before it ("smollm": SmolLM2's own tokenizer.json).
    """
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    byte_level = bool(steps) and kinds[-1] == "ByteLevel" and steps[-1].get("use_regex", True) \
        and not steps[-1].get("add_prefix_space", False)
    if byte_level and kinds == ["ByteLevel"]:
        return "gpt-2"
    if byte_level and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise ModelError(f"the tokenizer's pre-tokenizer {json.dumps(pre)} is not one llama.cpp is known to split text "
                     "the same way with (supported: ByteLevel, or Digits(individual) then ByteLevel)")


def built_tokenizer_fields(tokenizer, vocab_size: int) -> list[Field]:
    """GGUF tokenizer metadata for a Hugging Face fast byte-level BPE tokenizer, over `vocab_size` ids.

    Ids the tokenizer does not use (a model's vocabulary padded to a round size) become unused "[PAD<id>]" tokens,
    as llama.cpp's converter writes them. Added tokens are control tokens when special, user-defined otherwise.
    """
    from gguf import GGUFValueType as T  # only GGUF export needs it

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model = state.get("model", {})
    if model.get("type") != "BPE" or state.get("decoder", {}).get("type") != "ByteLevel":
        kind = model.get("type") or type(tokenizer).__name__
        raise ModelError(f"the tokenizer is {kind}, not byte-level BPE; GGUF export builds byte-level BPE tokenizers "
                         "only (GPT-2, SmolLM2, Llama 3 style) or copies a .gguf model's own")
    pre = pre_tokenizer_name(state.get("pre_tokenizer"))
    tokens, types = _vocabulary(model["vocab"], state.get("added_tokens", []), vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields = [Field("tokenizer.ggml.model", "gpt2", T.STRING), Field("tokenizer.ggml.pre", pre, T.STRING),
              Field("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
              Field("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
              Field("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if token_id is not None:
            fields.append(Field(f"tokenizer.ggml.{key}_token_id", int(token_id), T.UINT32))
    first, last = _ends_added(tokenizer)
    fields += [Field("tokenizer.ggml.add_bos_token", first, T.BOOL),
               Field("tokenizer.ggml.add_eos_token", last, T.BOOL)]
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        fields.append(Field("tokenizer.chat_template", tokenizer.chat_template, T.STRING))
    return fields


def _vocabulary(vocab: dict[str, int], added: list[dict], size: int) -> tuple[list[str], list[int]]:
    """(token text by id, token type by id) over `size` ids."""
    by_id = {i: (text, TOKEN_NORMAL) for text, i in vocab.items()}
    for token in added:
        by_id[token["id"]] = (token["content"], TOKEN_CONTROL if token.get("special") else TOKEN_USER_DEFINED)
    if by_id and max(by_id) >= size:
        raise ModelError(f"the tokenizer has token id {max(by_id)} but the model's vocabulary has {size} rows")
    entries = [by_id.get(i, (f"[PAD{i}]", TOKEN_UNUSED)) for i in range(size)]
    return [text for text, _ in entries], [kind for _, kind in entries]


def _ends_added(tokenizer) -> tuple[bool, bool]:
    """(BOS prepended, EOS appended) by the tokenizer to a plain text: what llama.cpp must do the same."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, len(ids) > 1 and eos is not None and ids[-1] == eos
