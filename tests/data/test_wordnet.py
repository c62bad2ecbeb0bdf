"""The shipped WordNet extract: it parses with lorafit.data, covers the 26 noun categories, its splits are disjoint,
and scripts/build_wordnet.py rebuilds it byte for byte from the WordNet database."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from lorafit.data import DataConfig, label_set, load_splits, read_rows
from tests.conftest import REPO

SHIPPED = REPO / "examples" / "wordnet"
WORDNET = Path("/usr/share/wordnet")
SPLITS = ("train", "val", "test")


def builder():
    spec = importlib.util.spec_from_file_location("build_wordnet", REPO / "scripts" / "build_wordnet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def shipped(task: str, suffix: str = "jsonl") -> dict:
    return {split: read_rows(SHIPPED / f"{task}_{split}.{suffix}")[0] for split in SPLITS}


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="WordNet 3.0 is not installed at /usr/share/wordnet "
                    "(Debian package wordnet-base); the rebuild cannot be checked here")
def test_builder_reproduces_the_shipped_files_byte_for_byte(tmp_path):
    written = builder().build(WORDNET, tmp_path, seed=0)
    names = sorted(p.name for p in SHIPPED.iterdir() if p.name != "README.md")
    assert sorted([*written, "LICENSE"]) == names
    for name in names:
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), f"{name} differs from a fresh build"


def test_category_files_parse_and_cover_all_26_noun_categories():
    jsonl, csv = shipped("category"), shipped("category", "csv")
    for split in SPLITS:
        assert read_rows(SHIPPED / f"category_{split}.jsonl")[1] == "instruction"
        assert read_rows(SHIPPED / f"category_{split}.csv")[1] == "classification"
        assert len({r.fields["output"] for r in jsonl[split]}) == 26
        pairs = [(r.fields["input"], r.fields["output"]) for r in jsonl[split]]
        assert pairs == [(r.fields["text"], r.fields["label"]) for r in csv[split]]  # the same synsets, same order
    labels = label_set(csv["train"], csv["val"] + csv["test"])
    assert len(labels) == 26 and labels[0] == "noun.Tops" and all(label.startswith("noun.") for label in labels)
    assert len(jsonl["train"]) > 1400 and len(jsonl["val"]) == len(jsonl["test"]) > 240


def test_splits_do_not_share_a_definition_or_a_reverse_dictionary_word():
    for task in ("category", "reverse"):
        rows = shipped(task)
        inputs = {split: {r.fields["input"] for r in rows[split]} for split in SPLITS}
        assert all(len(inputs[s]) == len(rows[s]) for s in SPLITS)  # no definition twice within a split
        assert not (inputs["train"] & inputs["val"] or inputs["train"] & inputs["test"])
        assert not inputs["val"] & inputs["test"]
    words = {split: [r.fields["output"] for r in rows] for split, rows in shipped("reverse").items()}
    assert [len(words[s]) for s in SPLITS] == [600, 60, 60]
    assert len(set(sum(words.values(), []))) == 720  # every word once across all splits


def test_reverse_answers_are_single_lowercase_words_absent_from_their_definition():
    for rows in shipped("reverse").values():
        for row in rows:
            word = row.fields["output"]
            assert re.fullmatch(r"[a-z]+", word), row.where
            assert not re.search(rf"\b{word}", row.fields["input"], re.IGNORECASE), row.where


def test_files_load_as_train_and_validation_splits():
    cfg = DataConfig(train=str(SHIPPED / "category_train.csv"), validation=str(SHIPPED / "category_val.csv"))
    train, val, fmt = load_splits(cfg, log=lambda _: None)
    assert fmt == "classification" and len(label_set(train, val)) == 26
    first = json.loads((SHIPPED / "reverse_train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"instruction", "input", "output"} and len(first["input"]) <= 200
