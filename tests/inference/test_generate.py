"""Generating: the prompt is fitted into the model's context, bad budgets and temperatures are refused."""

import pytest
import torch

from lorafit.inference.generate import fit_context, stream
from tests.conftest import TINY_WORDS, tiny_llama, tiny_tokenizer


def test_a_prompt_past_the_context_is_cut_from_the_left_and_the_cut_is_reported():
    model, tok = tiny_llama(), tiny_tokenizer()  # max_position_embeddings=64
    prompt = " ".join(TINY_WORDS * 20)  # 80 tokens
    notes: list[str] = []
    text = stream(model, tok, prompt, max_new_tokens=8, log=notes.append)
    assert notes and notes[0].startswith("prompt truncated to 56 tokens (the model's context is 64")
    assert isinstance(text, str)
    ids = torch.arange(80)[None]
    torch.testing.assert_close(fit_context(model, ids, 8, notes.append), ids[:, -56:])  # the newest tokens stay


def test_a_prompt_that_fits_is_left_alone():
    notes: list[str] = []
    ids = torch.arange(10)[None]
    assert fit_context(tiny_llama(), ids, 54, notes.append) is ids and not notes


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 64}, r"--max-new-tokens 64 leaves no room for a prompt in the model's context of 64"),
    ({"max_new_tokens": 0}, r"max_new_tokens \(--max-new-tokens\) must be >= 1"),
    ({"temperature": -1.0}, r"temperature \(--temperature\) must be >= 0"),
])
def test_budgets_and_temperatures_that_cannot_work_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stream(tiny_llama(), tiny_tokenizer(), "hello world", **kwargs)
