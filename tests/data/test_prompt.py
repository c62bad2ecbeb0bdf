"""The prompt record: derived from the training rows alone, and a user's text laid out with it gets exactly the
prompt tokens a training row with that input was trained on (chat template, Alpaca with bos, chat with a system
prompt). Offline: the tokenizers are trained here."""

import functools

import pytest
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from lorafit.data import (
    IGNORE,
    DataConfig,
    DataError,
    Row,
    encode,
    prompt_and_answer,
    prompt_ids,
    prompt_record,
    user_messages,
    user_prompt_ids,
)
from lorafit.data.prompt import check_record, user_row
from tests.conftest import byte_bpe

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOPIC = "Which topic is this text about? Answer with the topic only."
TEXTS = ["The striker scored twice in the final.", "Parliament passed the budget.", "A new vaccine was approved."]
TOPICS = ["sports", "politics", "health"]


@functools.cache
def _bpe() -> Tokenizer:
    corpus = [TOPIC, *TEXTS, *TOPICS, "### Instruction:\n### Input:\n### Response:\n", "What is the capital?"]
    return byte_bpe(corpus, 400, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"])


def chatml_tokenizer():
    """Byte-level BPE with SmolLM2's ChatML template (eos = end of turn)."""
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def llama_like_tokenizer():
    """No chat template (instructions use the Alpaca text) and bos put before plain text, as Llama's does."""
    tok = Tokenizer.from_str(_bpe().to_str())
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def topic_rows() -> list[Row]:
    return [Row({"instruction": TOPIC, "input": text, "output": topic}, "train.jsonl", i)
            for i, (text, topic) in enumerate(zip(TEXTS, TOPICS), 1)]


def trained_prompt(row: Row, fmt: str, tokenizer) -> list[int]:
    """The ids training masked as prompt: the leading run of IGNORE labels of the encoded row."""
    example = encode([row], fmt, tokenizer, DataConfig(train="t.jsonl", max_length=512))[0]
    n = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    return example.input_ids[:n]


@pytest.mark.parametrize(("make", "layout"), [(chatml_tokenizer, "chat_template"), (llama_like_tokenizer, "alpaca")])
def test_a_users_text_gets_the_training_rows_prompt_token_for_token(make, layout):
    tok = make()
    record = prompt_record(topic_rows(), "instruction", tok)
    assert record == {"version": 1, "format": "instruction", "layout": layout, "instruction": TOPIC, "system": None}
    question = "What is the capital of France?"
    row = Row({"instruction": TOPIC, "input": question, "output": "geography"}, "train.jsonl", 9)
    ids = user_prompt_ids(record, tok, question)
    assert ids == prompt_ids(row, "instruction", tok) == trained_prompt(row, "instruction", tok)
    bos = 1 if layout == "alpaca" else 0  # bos, as training put it before the Alpaca text
    assert ids[:bos] == [tok.bos_token_id] * bos
    assert tok.decode(ids[bos:]) == prompt_and_answer(row, "instruction", tok)[0]


def test_rows_without_a_shared_instruction_make_the_users_text_the_instruction():
    tok = chatml_tokenizer()
    rows = [Row({"instruction": text, "input": "", "output": t}, "train.jsonl", i)
            for i, (text, t) in enumerate(zip(TEXTS, TOPICS), 1)]
    record = prompt_record(rows, "instruction", tok)
    assert record["instruction"] is None
    row = Row({"instruction": "What is the capital?", "input": "", "output": "x"}, "train.jsonl", 1)
    assert user_prompt_ids(record, tok, "What is the capital?") == trained_prompt(row, "instruction", tok)
    one = prompt_record(topic_rows()[:1], "instruction", tok)  # one row: nothing varies, nothing is shared
    assert one["instruction"] is None


def test_chat_rows_sharing_a_system_prompt_give_it_to_the_users_first_turn():
    tok = chatml_tokenizer()
    system = {"role": "system", "content": TOPIC}
    rows = [Row({"messages": [system, {"role": "user", "content": text}, {"role": "assistant", "content": t}]},
                "chat.jsonl", i) for i, (text, t) in enumerate(zip(TEXTS, TOPICS), 1)]
    record = prompt_record(rows, "chat", tok)
    assert (record["layout"], record["system"]) == ("chat_template", TOPIC)
    question = "What is the capital of France?"
    row = Row({"messages": [system, {"role": "user", "content": question}, {"role": "assistant", "content": "x"}]},
              "chat.jsonl", 9)
    assert user_prompt_ids(record, tok, question) == prompt_ids(row, "chat", tok) == trained_prompt(row, "chat", tok)
    assert user_messages(record, tok, question) == row.fields["messages"][:2]
    rows[1].fields["messages"][0] = {"role": "system", "content": "another"}
    assert prompt_record(rows, "chat", tok)["system"] is None


def test_text_and_classification_records_leave_the_text_as_it_is():
    tok = llama_like_tokenizer()
    rows = [Row({"text": text}, "t.jsonl", i) for i, text in enumerate(TEXTS, 1)]
    record = prompt_record(rows, "text", tok)
    assert (record["layout"], record["instruction"], record["system"]) == ("plain", None, None)
    full = encode([Row({"text": TEXTS[0]}, "t.jsonl", 1)], "text", tok, DataConfig(train="t.jsonl"))[0].input_ids
    assert user_prompt_ids(record, tok, TEXTS[0]) == full[:-1]  # the row's tokens before its eos
    classes = prompt_record([Row({"text": t, "label": x}, "c.csv", 2) for t, x in zip(TEXTS, TOPICS)],
                            "classification", tok)
    assert classes["layout"] == "plain" and user_row(classes, "hi").fields["text"] == "hi"


def test_a_tokenizer_with_another_layout_is_a_clear_error_naming_raw():
    record = prompt_record(topic_rows(), "instruction", llama_like_tokenizer())  # Alpaca
    with pytest.raises(DataError, match="trained with the alpaca prompt layout.*--raw"):
        user_prompt_ids(record, chatml_tokenizer(), "hello")


def test_a_prompt_file_that_is_not_a_record_is_refused_with_its_name():
    with pytest.raises(DataError, match="lorafit_prompt.json: not a prompt record"):
        check_record({"format": "poem"}, "a/lorafit_prompt.json")
    with pytest.raises(DataError, match="instruction must be a string or null"):
        check_record({"format": "instruction", "layout": "alpaca", "instruction": 3}, "a/lorafit_prompt.json")
