"""The seam for LoRA variants: an update class picked by LoraConfig.variant, with merging going through it."""

import pytest
import torch

import lorafit
from lorafit.core.lora import LowRank
from lorafit.core.variants import VARIANTS, register, variant
from tests.conftest import randomize_lora, tiny_llama


class DoubledRank(LowRank):
    """A stand-in variant whose update counts twice: y + 2 B A x, and W0 + 2 ΔW when merged."""

    def add_to(self, y, x, layer):
        return y + 2 * self(x).to(y.dtype)

    def fold(self, weight, delta, sign=1.0, transposed=False):
        return super().fold(weight, 2 * delta, sign, transposed)


@pytest.fixture
def doubled():
    register("doubled", DoubledRank)
    yield "doubled"
    del VARIANTS["doubled"]


def test_plain_lora_is_the_registered_default_and_unknown_variants_are_refused():
    assert variant("lora") is LowRank and lorafit.LoraConfig().variant == "lora"
    with pytest.raises(KeyError, match="no LoRA variant 'vera'; registered: dora, lora"):
        variant("vera")
    with pytest.raises(lorafit.ConfigError, match="variant must be one of dora, lora, got 'vera'"):
        lorafit.LoraConfig(variant="vera")
    with pytest.raises(ValueError, match="registered already"):
        register("lora", DoubledRank)


def test_a_registered_variant_builds_the_updates_and_merge_goes_through_its_fold(doubled, ids):
    """The variant's forward and its merged weight agree, and differ from plain LoRA's with the same A and B: a
    merge that bypassed the variant (W0 + BA) would not match its unmerged output."""
    plain, twice = tiny_llama(), tiny_llama()
    lorafit.inject(plain, lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    lorafit.inject(twice, lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"], variant=doubled))
    randomize_lora(plain)
    randomize_lora(twice)  # same seed: the same A and B
    layer = twice.model.layers[0].self_attn.q_proj
    assert type(layer.lora["default"]) is DoubledRank
    unmerged = twice(ids).logits
    assert not torch.allclose(unmerged, plain(ids).logits, atol=1e-4)
    lorafit.merge(twice)
    torch.testing.assert_close(twice(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    base = tiny_llama().model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(layer.weight, base + 2 * layer.delta_weight("default"), rtol=1e-6, atol=1e-6)
    lorafit.unmerge(twice)
    torch.testing.assert_close(layer.weight, base, rtol=1e-6, atol=1e-6)


def test_an_embedding_refuses_a_variant_it_has_no_form_for(doubled):
    with pytest.raises(ValueError, match="no form for embedding tables"):
        lorafit.inject(tiny_llama(), lorafit.LoraConfig(targets=["embed_tokens"], variant=doubled))
