"""Using a trained adapter: a classifier's labels and probabilities, a generator's answers to prompts laid out as
its training rows were, per-class scores, and the output files. Tiny random-weight models, offline."""

import csv
import io
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorafit.data import IGNORE, PROMPT_FILE, DataConfig, Example, Row, encode, prompt_record
from lorafit.inference import generate as gen
from lorafit.inference import predict as pred
from lorafit.inference.scoring import class_scores
from tests.conftest import TINY_WORDS, tiny_classifier_adapter, tiny_generator_adapter, tiny_tokenizer

LABELS = ["animal", "greeting", "other"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def topic_rows() -> list[Row]:
    """Instruction rows sharing one instruction, the text in `input`: the shape of the user's topic data."""
    return [Row({"instruction": "cat dog", "input": f"{a} {b}", "output": a}, "train.jsonl", i)
            for i, (a, b) in enumerate(zip(TINY_WORDS, reversed(TINY_WORDS)), 1)]


def generator_adapter(tmp_path, with_record: bool = True):
    """A LoRA adapter on a tiny Llama (no chat template: the Alpaca layout), with or without its prompt record."""
    tok = tiny_tokenizer()
    side = {PROMPT_FILE: prompt_record(topic_rows(), "instruction", tok)} if with_record else {}
    return str(tiny_generator_adapter(tmp_path, side)), tok


def test_a_classifier_gives_each_text_its_label_and_softmax_probabilities(tmp_path):
    adapter = str(tiny_classifier_adapter(tmp_path, LABELS))
    texts = ["cat hello", "dog world world", "hello", "world cat dog hello"]
    out = pred.predict(adapter, pred.text_rows(texts), batch_size=3, log=lambda _: None)
    net, tok, _ = gen.load_with_adapters(None, [adapter])
    with torch.no_grad():
        expected = [net(**tok(text, return_tensors="pt")).logits[0].softmax(-1) for text in texts]
    assert [r["text"] for r in out] == texts
    for row, probs in zip(out, expected, strict=True):
        assert list(row["probabilities"]) == LABELS and row["label"] == LABELS[int(probs.argmax())]
        assert list(row["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-5)


def test_generate_refuses_a_classifier_adapter_and_points_to_predict(tmp_path):
    adapter = str(tiny_classifier_adapter(tmp_path, LABELS))
    with pytest.raises(ValueError, match="classifier adapter labels text.*lorafit predict --adapter"):
        gen.require_generative([adapter])


def test_a_generator_answers_each_row_from_the_prompt_its_training_rows_had(tmp_path, monkeypatch):
    adapter, tok = generator_adapter(tmp_path)
    record = gen.prompt_record_of(adapter)
    assert record["layout"] == "alpaca" and record["instruction"] == "cat dog"
    row = Row({"instruction": "cat dog", "input": "hello world", "output": "cat"}, "train.jsonl", 1)
    example = encode([row], "instruction", tok, DataConfig(train="t.jsonl"))[0]
    trained = example.input_ids[:next(i for i, label in enumerate(example.labels) if label != IGNORE)]
    assert gen.prompt_ids(tok, "hello world", record) == trained  # what generate, chat and predict send

    sent = []
    real = pred.generate
    monkeypatch.setattr(pred, "generate", lambda model, tok, prompts, *a: sent.extend(prompts) or real(model, tok,
                                                                                                       prompts, *a))
    rows = pred.text_rows(["hello world", "dog"]) + [Row({"instruction": "dog", "input": "cat"}, "in.jsonl", 3)]
    out = pred.predict(adapter, rows, batch_size=2, max_new_tokens=3, log=lambda _: None)
    assert sent[0] == trained and sent[2] == gen.prompt_ids(tok, "cat", {**record, "instruction": "dog"})
    assert [set(r) for r in out] == [{"text", "output"}, {"text", "output"}, {"instruction", "input", "output"}]
    assert all(isinstance(r["output"], str) for r in out)
    sent.clear()
    pred.predict(adapter, rows[:1], raw=True, max_new_tokens=1, log=lambda _: None)
    assert sent == [tok(gen.render(tok, "hello world"), add_special_tokens=False)["input_ids"]] != [trained]


def test_an_adapter_folder_without_a_prompt_record_sends_text_as_before(tmp_path):
    adapter, tok = generator_adapter(tmp_path, with_record=False)
    assert gen.prompt_record_of(adapter) is None
    assert gen.prompt_ids(tok, "hello world") == tok(gen.render(tok, "hello world"), add_special_tokens=False)[
        "input_ids"]
    notes = []
    out = pred.predict(adapter, pred.text_rows(["hello"]), max_new_tokens=2, log=notes.append)
    assert len(out) == 1 and "no prompt record" in notes[0]


def test_predictions_render_as_jsonl_and_as_csv_with_a_column_per_class():
    records = [{"text": "a, b", "label": "animal", "probabilities": {"animal": 0.75, "other": 0.25}},
               {"text": 'say "hi"', "label": "other", "probabilities": {"animal": 0.1, "other": 0.9}}]
    assert [json.loads(line) for line in pred.render_predictions(records, "jsonl").splitlines()] == records
    table = list(csv.DictReader(io.StringIO(pred.render_predictions(records, "csv"))))
    assert table[0] == {"text": "a, b", "label": "animal", "p(animal)": "0.75", "p(other)": "0.25"}
    assert table[1]["text"] == 'say "hi"'
    answers = [{"text": "one", "output": "a"}, {"instruction": "two", "input": "three", "output": "b"}]
    mixed = list(csv.DictReader(io.StringIO(pred.render_predictions(answers, "csv"))))
    assert mixed[1] == {"text": "", "output": "b", "instruction": "two", "input": "three"}
    assert pred.output_format(None, "out.CSV") == "csv" and pred.output_format(None, None) == "jsonl"
    with pytest.raises(ValueError, match="--format must be one of jsonl, csv"):
        pred.output_format("xml", None)


class FixedClassifier(nn.Module):
    """Logits chosen by the first token id: a classifier whose predictions the test picks."""

    def __init__(self, logits: list[list[float]]):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(logits), requires_grad=False)
        self.config = SimpleNamespace(id2label=dict(enumerate(LABELS)))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_per_class_precision_recall_f1_and_confusion_match_a_hand_count():
    truth, guess = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    model = FixedClassifier([[3.0 if c == g else 0.0 for c in range(3)] for g in guess])
    examples = [Example([i, 1], t) for i, t in enumerate(truth)]
    rows = [Row({"text": f"t{i}", "label": LABELS[t]}, "val.csv", i + 2) for i, t in enumerate(truth)]
    result = class_scores(model, rows, examples, batch_size=2, pad_id=0)
    assert result["value"] == pytest.approx(60.0)
    per = result["per_class"]
    assert (per["animal"]["precision"], per["animal"]["recall"], per["animal"]["support"]) == (0.5, 0.5, 2)
    assert per["greeting"]["precision"] == pytest.approx(2 / 3) and per["greeting"]["recall"] == 1.0
    assert per["greeting"]["f1"] == pytest.approx(0.8) and per["other"]["f1"] == 0.0
    assert result["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert result["predictions"][1] == {"text": "t1", "label": "animal", "prediction": "greeting",
                                        "probabilities": pytest.approx({"animal": 0.0453, "greeting": 0.9094,
                                                                        "other": 0.0453}, abs=1e-4)}
