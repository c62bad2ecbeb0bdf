"""Mixed-adapter batches (lorafit.core.mixed): each row equals that row run alone with its adapter, and PEFT's
`adapter_names` mixed batch gives the same logits."""

import pytest
import torch

import lorafit as lf
from tests.conftest import randomize_lora, tiny_gpt2, tiny_llama

NAMES = ["a", None, "b", "c", "a"]


def three_adapters(model, targets):
    """Adapters a, b, c with different ranks, alphas and targets, all non-zero."""
    lf.inject(model, lf.LoraConfig(r=2, alpha=4, targets=targets[:1]), name="a")
    lf.inject(model, lf.LoraConfig(r=8, alpha=3, targets=targets), name="b")
    lf.inject(model, lf.LoraConfig(r=4, alpha=16, targets=targets[1:]), name="c")
    randomize_lora(model, seed=3)
    return model


def alone(model, ids, name):
    if name is None:
        with lf.disabled(model):
            return model(ids).logits
    lf.set_adapter(model, name)
    return model(ids).logits


@pytest.mark.parametrize("build, targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]),
                                            (tiny_gpt2, ["c_attn", "c_fc"])])
@torch.no_grad()
def test_each_row_equals_that_row_alone(build, targets):
    model = three_adapters(build(), targets)
    ids = torch.randint(0, 128, (len(NAMES), 10), generator=torch.Generator().manual_seed(0))
    with lf.per_row(model, NAMES):
        mixed = model(ids).logits
    for i, name in enumerate(NAMES):
        expected = alone(model, ids[i:i + 1], name)
        assert (mixed[i] - expected[0]).abs().max().item() <= 1e-5, (i, name)
    assert (alone(model, ids[:1], "a") - alone(model, ids[:1], "b")).abs().max() > 1e-3  # the adapters differ
    assert all(layer.bank is None for _, layer in lf.lora_layers(model))  # nothing left behind


@torch.no_grad()
def test_greedy_generation_is_token_identical_per_row():
    model = three_adapters(tiny_llama(), ["q_proj", "v_proj", "o_proj"])
    ids = torch.randint(0, 128, (len(NAMES), 6), generator=torch.Generator().manual_seed(1))
    with lf.per_row(model, NAMES):
        mixed = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, name in enumerate(NAMES):
        if name is None:
            with lf.disabled(model):
                row = model.generate(ids[i:i + 1], max_new_tokens=8, do_sample=False, pad_token_id=0)
        else:
            lf.set_adapter(model, name)
            row = model.generate(ids[i:i + 1], max_new_tokens=8, do_sample=False, pad_token_id=0)
        n = row.shape[1]  # a row that met EOS early is padded in the batch
        assert torch.equal(mixed[i, :n], row[0]) and (mixed[i, n:] == 0).all(), (i, name)


def test_errors_name_the_adapter():
    model = three_adapters(tiny_llama(), ["q_proj", "v_proj"])
    with pytest.raises(KeyError, match="'nope'.*it has: a, b, c"):
        with lf.per_row(model, ["a", "nope"]):
            pass
    ids = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="2 names for a batch of 3"):
        with lf.per_row(model, ["a", "b"]):
            model(ids)
    lf.set_adapter(model, "a")
    lf.merge(model)
    with pytest.raises(ValueError, match="merged.*unmerge first"):
        with lf.per_row(model, ["a", "b"]):
            pass


def test_embedding_adapters_are_refused():
    model = tiny_llama()
    lf.inject(model, lf.LoraConfig(r=2, targets=["embed_tokens", "q_proj"]), name="emb")
    with pytest.raises(ValueError, match="embedding table"):
        with lf.per_row(model, ["emb"]):
            pass


@torch.no_grad()
def test_matches_peft_adapter_names_batch(tmp_path):
    peft = pytest.importorskip("peft")
    model = three_adapters(tiny_llama(), ["q_proj", "v_proj", "o_proj"])
    for name in ("a", "b", "c"):
        lf.save_adapter(model, tmp_path / name, name=name)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    theirs.eval()
    ids = torch.randint(0, 128, (len(NAMES), 10), generator=torch.Generator().manual_seed(2))
    peft_names = [n or "__base__" for n in NAMES]
    expected = theirs(input_ids=ids, adapter_names=peft_names).logits
    with lf.per_row(model, NAMES):
        ours = model(ids).logits
    assert (ours - expected).abs().max().item() <= 1e-4
