"""Texts to predict on: .txt, .jsonl and .csv files read into rows that keep their lines; bad ones name the line."""

import json

import pytest

from lorafit.data import DataError, read_inputs


def test_txt_jsonl_and_csv_inputs_give_one_row_per_text_with_its_line(tmp_path):
    (tmp_path / "a.txt").write_text("first text\n\n  \nsecond, with a comma\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one", "id": 7}) + "\n\n"
                                      + json.dumps({"instruction": "Which topic?", "input": "two"}) + "\n")
    (tmp_path / "c.csv").write_text('id,text\n1,"a, quoted text"\n2,plain\n')
    txt, jsonl, table = (read_inputs(tmp_path / name) for name in ("a.txt", "b.jsonl", "c.csv"))
    assert [(r.fields, r.line) for r in txt] == [({"text": "first text"}, 1), ({"text": "second, with a comma"}, 4)]
    assert [(r.fields, r.line) for r in jsonl] == [({"text": "one"}, 1), ({"instruction": "Which topic?",
                                                                           "input": "two"}, 3)]
    assert [(r.fields, r.line) for r in table] == [({"text": "a, quoted text"}, 2), ({"text": "plain"}, 3)]


@pytest.mark.parametrize(("name", "content", "match"), [
    ("x.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', r"x.jsonl line 2: needs a 'text' field.*'body'"),
    ("x.jsonl", '{"text": 3}\n', r"x.jsonl line 1: field 'text' must be a string"),
    ("x.jsonl", "not json\n", r"x.jsonl line 1: not valid JSON"),
    ("x.csv", "words\nhello\n", r"x.csv line 2: needs a 'text' field"),
    ("x.txt", "\n\n", r"x.txt: the file holds no texts"),
    ("x.parquet", "", r"x.parquet: unsupported input file; use one of .txt, .jsonl, .csv"),
])
def test_bad_input_files_name_the_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        read_inputs(tmp_path / name)
