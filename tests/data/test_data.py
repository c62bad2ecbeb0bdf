"""Data: files read into validated rows, errors point at file and line, prompt masking is exact, packing and
batching keep tokens and labels aligned and are deterministic. Offline: the tokenizers are trained here."""

import csv
import functools
import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from lorafit.data import (
    ALPACA_PROMPT,
    IGNORE,
    DataConfig,
    DataError,
    Example,
    batches,
    collate,
    encode,
    label_set,
    load_splits,
    pack,
    prompt_and_answer,
    prompt_ids,
    read_rows,
)
from tests.conftest import byte_bpe

# SmolLM2's template: ChatML, a default system turn, and every turn (the answer too) closed by <|im_end|> + "\n".
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["What is the capital of France? Paris.", "Add two and two: four. Then six.", "hello world, the end",
          "### Instruction:\n### Input:\n### Response:\n", "a dog is a domestic animal; a cat too"]
ROW = {"instruction": "Name the capital.", "input": "France", "output": "Paris"}


@functools.cache
def _bpe() -> Tokenizer:
    return byte_bpe(CORPUS, 320, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def chat_tokenizer():
    """Byte-level BPE with SmolLM2's ChatML template; eos is the end-of-turn token <|im_end|>."""
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def plain_tokenizer():
    """The same vocabulary without a chat template (GPT-2 style: eos <|endoftext|>), so instructions use Alpaca."""
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cfg_for(path, **kw):
    return DataConfig(train=str(path), **kw)


def answer_text(tok, example):
    return tok.decode([t for t in example.labels if t != IGNORE])


def answer_runs(tok, example):
    """Decoded runs of consecutive unmasked labels."""
    runs, current = [], []
    for label in example.labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


# ------------------------------------------------------------------------------------------------ masking


def test_instruction_with_chat_template_masks_exactly_the_prompt_and_ends_with_one_eos(tmp_path):
    tok = chat_tokenizer()
    rows, fmt = read_rows(write_jsonl(tmp_path / "train.jsonl", [ROW]))
    [ex] = encode(rows, fmt, tok, cfg_for(tmp_path / "train.jsonl"))
    prompt = prompt_ids(rows[0], fmt, tok)
    assert ex.input_ids[: len(prompt)] == prompt  # training sees the ids generation will start from
    assert all(label == IGNORE for label in ex.labels[: len(prompt)])
    assert answer_text(tok, ex) == "Paris<|im_end|>"
    assert ex.labels[len(prompt):len(prompt) + 2] == ex.input_ids[len(prompt):len(prompt) + 2]
    assert tok.decode(ex.input_ids).endswith("<|im_start|>assistant\nParis<|im_end|>\n")  # no doubled eos
    assert tok.decode(ex.input_ids).count("<|im_end|>") == 3  # system, user, assistant turns
    text, answer = prompt_and_answer(rows[0], fmt, tok)
    assert text.endswith("<|im_start|>user\nName the capital.\n\nFrance<|im_end|>\n<|im_start|>assistant\n")
    assert answer == "Paris"


def test_instruction_without_chat_template_uses_alpaca_and_appends_eos(tmp_path):
    tok = plain_tokenizer()
    rows, fmt = read_rows(write_jsonl(tmp_path / "train.jsonl", [ROW, {**ROW, "input": ""}]))
    with_input, without_input = encode(rows, fmt, tok, cfg_for(tmp_path / "train.jsonl"))
    prompt = ALPACA_PROMPT.format(instruction="Name the capital.", input="France")
    assert tok.decode(with_input.input_ids) == prompt + "Paris<|endoftext|>"
    assert "### Input:" not in tok.decode(without_input.input_ids)
    for ex, row in zip([with_input, without_input], rows, strict=True):
        n = len(prompt_ids(row, fmt, tok))
        assert set(ex.labels[:n]) == {IGNORE} and ex.labels[n:] == ex.input_ids[n:]
        assert answer_text(tok, ex) == "Paris<|endoftext|>"


def test_mask_prompt_false_trains_on_every_token(tmp_path):
    tok = chat_tokenizer()
    rows, fmt = read_rows(write_jsonl(tmp_path / "train.jsonl", [ROW]))
    [ex] = encode(rows, fmt, tok, cfg_for(tmp_path / "train.jsonl", mask_prompt=False))
    assert ex.labels == ex.input_ids


def test_chat_rows_train_every_assistant_turn_and_nothing_else(tmp_path):
    tok = chat_tokenizer()
    conv = {"messages": [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"},
                         {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "six"}]}
    rows, fmt = read_rows(write_jsonl(tmp_path / "chat.jsonl", [conv]))
    assert fmt == "chat"
    [ex] = encode(rows, fmt, tok, cfg_for(tmp_path / "chat.jsonl"))
    assert answer_runs(tok, ex) == ["four<|im_end|>", "six<|im_end|>"]
    assert sum(t == tok.eos_token_id for t in ex.input_ids) == 5  # one per turn, none added
    prompt, answer = prompt_and_answer(rows[0], fmt, tok)
    assert prompt.endswith("and then?<|im_end|>\n<|im_start|>assistant\n") and answer == "six"
    assert ex.input_ids[: len(prompt_ids(rows[0], fmt, tok))] == prompt_ids(rows[0], fmt, tok)


def test_chat_rows_need_a_template_that_only_appends(tmp_path):
    rows, fmt = read_rows(write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]))
    with pytest.raises(DataError, match="chat template"):
        encode(rows, fmt, plain_tokenizer(), cfg_for(tmp_path / "chat.jsonl"))
    odd = chat_tokenizer()
    odd.chat_template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match=r"chat\.jsonl line 1: the chat template renders turn 1 differently"):
        encode(rows, fmt, odd, cfg_for(tmp_path / "chat.jsonl"))


def test_text_rows_train_on_all_tokens_and_end_with_eos(tmp_path):
    tok = plain_tokenizer()
    rows, fmt = read_rows(write_jsonl(tmp_path / "lm.jsonl", [{"text": "hello world"}]))
    [ex] = encode(rows, fmt, tok, cfg_for(tmp_path / "lm.jsonl"))
    assert fmt == "text" and ex.labels == ex.input_ids and tok.decode(ex.input_ids) == "hello world<|endoftext|>"


def test_classification_rows_get_class_indices_from_label_set(tmp_path):
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": "a dog", "label": "animal"}, {"text": "a cat", "label": 7}])
    rows, fmt = read_rows(path)
    labels = label_set(rows, [])
    assert fmt == "classification" and labels == ["7", "animal"]
    examples = encode(rows, fmt, plain_tokenizer(), cfg_for(path), labels)
    assert [e.labels for e in examples] == [1, 0]
    with pytest.raises(DataError, match="packing"):
        encode(rows, fmt, plain_tokenizer(), cfg_for(path, packing=True), labels)


# ------------------------------------------------------------------------------------------------ files


def test_jsonl_csv_and_parquet_give_the_same_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = [{"text": "a dog", "label": "animal"}, {"text": "bread, with, commas", "label": "food"}]
    write_jsonl(tmp_path / "d.jsonl", data)
    with (tmp_path / "d.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(data)
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "d.parquet")
    lines = {".jsonl": [1, 2], ".csv": [2, 3], ".parquet": [0, 1]}  # the CSV header is line 1
    for suffix, expected in lines.items():
        rows, fmt = read_rows(tmp_path / f"d{suffix}")
        assert fmt == "classification" and [r.fields for r in rows] == data
        assert [r.line for r in rows] == expected
    assert read_rows(tmp_path / "d.parquet")[0][1].where.endswith("d.parquet row 1")


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ({"instruction": "x"}, "missing field 'output'"),
    ({"instruction": "x", "output": "   "}, "field 'output' is empty"),
    ({"instruction": "x", "output": 3}, "field 'output' must be a string, got int"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "field 'input' must be a string"),
    ("[1, 2]", "expected a JSON object"),
])  # fmt: skip
def test_a_bad_row_names_the_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "train.jsonl", [ROW, ROW, bad, ROW])
    with pytest.raises(DataError, match=message) as err:
        read_rows(path)
    assert "train.jsonl line 3" in str(err.value) and "skip_bad_rows" in str(err.value)


def test_bad_csv_and_parquet_rows_name_their_line_or_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "d.csv").write_text("text,label\na dog,animal\n,food\n")
    with pytest.raises(DataError, match=r"d\.csv line 3: field 'text' is empty"):
        read_rows(tmp_path / "d.csv")
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": "x"}, {"text": None, "label": "y"}]),
                   tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet row 1: missing field 'text'"):
        read_rows(tmp_path / "d.parquet", "classification")


def test_skip_bad_rows_skips_and_reports_how_many(tmp_path):
    logged = []
    path = write_jsonl(tmp_path / "train.jsonl", ["{oops", ROW, {"instruction": "x"}, ROW, ""])
    rows, fmt = read_rows(path, skip_bad_rows=True, log=logged.append)
    assert fmt == "instruction" and len(rows) == 2 and rows.skipped == 2 and [r.line for r in rows] == [2, 4]
    assert len(logged) == 1 and "skipped 2 bad row(s)" in logged[0] and "train.jsonl line 1" in logged[0]


def test_an_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no data to use .the file holds no rows"):
        read_rows(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "bad.jsonl", ["{x", "{y"])
    with pytest.raises(DataError, match="all 2 rows are bad"):
        read_rows(tmp_path / "bad.jsonl", skip_bad_rows=True, log=lambda _: None)
    with pytest.raises(DataError, match="file not found"):
        read_rows(tmp_path / "missing.jsonl")


def test_unknown_fields_and_bad_config_name_what_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"x\.jsonl line 1: cannot tell the format from fields \['prompt'\]"):
        read_rows(write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p"}]))
    for kwargs, field in [({"val_fraction": 1.0}, "val_fraction"), ({"format": "alpaca"}, "format"),
                          ({"max_length": 0}, "max_length"), ({"overflow": "drop"}, "overflow"),
                          ({"train": "t.txt"}, "train"), ({"packing": "yes"}, "packing")]:
        with pytest.raises(DataError, match=field):
            DataConfig(**{"train": "t.jsonl", **kwargs})


# ------------------------------------------------------------------------------------------------ lengths, labels


def test_overflow_error_names_line_and_length_and_truncate_keeps_the_answer(tmp_path):
    tok = chat_tokenizer()
    long_row = {**ROW, "input": "the end " * 40}
    path = write_jsonl(tmp_path / "train.jsonl", [ROW, long_row])
    rows, fmt = read_rows(path)
    full = encode(rows, fmt, tok, cfg_for(path, max_length=4096))[1]
    too_long = rf"train\.jsonl line 2: {len(full.input_ids)} tokens, more than max_length=100"
    with pytest.raises(DataError, match=too_long):
        encode(rows, fmt, tok, cfg_for(path, max_length=100, overflow="error"))
    short = encode(rows, fmt, tok, cfg_for(path, max_length=100))[1]
    assert short.input_ids == full.input_ids[-100:] and answer_text(tok, short) == "Paris<|im_end|>"
    text_rows, _ = read_rows(write_jsonl(tmp_path / "lm.jsonl", [{"text": "hello world " * 20}]))
    [ex] = encode(text_rows, "text", tok, cfg_for(path, max_length=8))
    assert tok.decode(ex.input_ids).startswith("hello world") and len(ex.input_ids) == 8


def test_validation_labels_missing_from_train_are_reported(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "c", "label": "x"}, {"text": "d", "label": "z"}])
    cfg = DataConfig(train=str(train), validation=str(val))
    tr, va, fmt = load_splits(cfg)
    with pytest.raises(DataError, match=r"val\.jsonl line 2: validation label 'z' never occurs in the training"):
        label_set(tr, va)
    logged = []
    tr, va, _ = load_splits(DataConfig(train=str(train), validation=str(val), skip_bad_rows=True), log=logged.append)
    assert [r.fields["label"] for r in va] == ["x"] and "label never occurs in train" in logged[0]
    assert label_set(tr, va) == ["x", "y"]


def test_val_fraction_split_is_deterministic_and_keeps_labels_learnable(tmp_path):
    rows = [{"text": f"t{i}", "label": "common"} for i in range(30)] + [{"text": "r", "label": "rare"}]
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows), val_fraction=0.2)
    quiet = lambda _: None  # noqa: E731
    train, val, _ = load_splits(cfg, seed=3, log=quiet)
    again, val_again, _ = load_splits(cfg, seed=3, log=quiet)
    other, val_other, _ = load_splits(cfg, seed=4, log=quiet)
    assert [r.line for r in val] == [r.line for r in val_again] != [r.line for r in val_other]
    assert sorted(r.line for r in train + val) == list(range(1, 32)) and len(val) in (5, 6)
    assert all(r.fields["label"] == "common" for r in val)  # "rare" alone in val would be unlearnable
    label_set(train, val)


# ------------------------------------------------------------------------------------------------ packing, batches


def test_packing_makes_full_rows_with_labels_beside_their_tokens(tmp_path):
    tok = chat_tokenizer()
    path = write_jsonl(tmp_path / "train.jsonl", [{**ROW, "output": f"Paris {i}"} for i in range(9)])
    rows, fmt = read_rows(path)
    plain = encode(rows, fmt, tok, cfg_for(path))
    packed = encode(rows, fmt, tok, cfg_for(path, packing=True, max_length=32))
    stream = [t for e in plain for t in e.input_ids]
    labels = [t for e in plain for t in e.labels]
    assert all(len(e.input_ids) == len(e.labels) == 32 for e in packed) and len(packed) == len(stream) // 32
    assert [t for e in packed for t in e.input_ids] == stream[: 32 * len(packed)]
    assert [t for e in packed for t in e.labels] == labels[: 32 * len(packed)]
    assert pack([Example([1, 2, 3], [IGNORE, 2, 3])], 8) == [Example([1, 2, 3], [IGNORE, 2, 3])]


def test_collate_pads_right_with_ignore_labels():
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0, multiple=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    classes = collate([Example([1, 2], 1), Example([3], 0)], pad_id=0)["labels"]
    assert classes.dtype == torch.long and classes.tolist() == [1, 0]
    bucketed = collate([Example([5, 6, 7], [IGNORE, 6, 7])] * 2 + [Example([1] * 17, [1] * 17)], pad_id=0)
    assert bucketed["input_ids"].shape == (3, 32)  # 17 tokens round up to the next multiple of 16
    assert bucketed["attention_mask"][0].tolist() == [1] * 3 + [0] * 29 and (bucketed["labels"][0, 3:] == IGNORE).all()


def test_bucket_padding_leaves_the_loss_unchanged():
    from lorafit.training.loop import loss_of
    from tests.conftest import tiny_llama

    model = tiny_llama()
    examples = [Example(list(range(3, 12)), [IGNORE] * 4 + list(range(7, 12))), Example([4, 5, 6], [4, 5, 6])]
    tight, bucketed = (loss_of(model, collate(examples, pad_id=0, multiple=m)) for m in (1, 16))
    torch.testing.assert_close(tight, bucketed)


def test_batches_are_deterministic_per_seed_and_epoch_and_start_resumes():
    examples = [Example([i], [i]) for i in range(10)]

    def order(**kw):
        return [b["input_ids"][:, 0].tolist() for b in batches(examples, 3, 0, **kw)]

    first = order(shuffle=True, seed=1, epoch=0)
    assert first == order(shuffle=True, seed=1, epoch=0)
    assert first != order(shuffle=True, seed=1, epoch=1) and first != order(shuffle=True, seed=2, epoch=0)
    assert sorted(sum(first, [])) == list(range(10)) and [len(b) for b in first] == [3, 3, 3, 1]
    assert order(shuffle=True, seed=1, epoch=0, start=2) == first[2:]
    assert order(shuffle=False, seed=9) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
