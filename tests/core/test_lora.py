"""The maths of lora.py against plain fp32/fp64 computations."""

import math

import pytest
import torch
from torch import nn

import lorafit
from lorafit.core.lora import LoraEmbedding, LoraLinear, LowRank


def test_low_rank_forward_is_x_At_Bt_times_scale_in_float64():
    update = LowRank(in_features=7, out_features=5, r=3, scale=2.0, dropout=0.0, init="kaiming").double()
    nn.init.normal_(update.lora_B)
    x = torch.randn(4, 7, dtype=torch.float64)
    expected = x @ update.lora_A.T @ update.lora_B.T * 2.0
    torch.testing.assert_close(update(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(update.delta_weight(), update.lora_B @ update.lora_A * 2.0)


def test_b_starts_at_zero_and_a_is_not():
    update = LowRank(16, 8, r=4, scale=1.0, dropout=0.0, init="kaiming")
    assert torch.count_nonzero(update.lora_B) == 0
    assert torch.count_nonzero(update.lora_A) == update.lora_A.numel()
    bound = 1 / math.sqrt(16)  # kaiming-uniform with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert update.lora_A.abs().max() <= bound


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    update = LowRank(4096, 8, r=4, scale=1.0, dropout=0.0, init="gaussian")
    assert abs(update.lora_A.std().item() - 0.25) < 0.01


@pytest.mark.parametrize("rslora, expected", [(False, 16 / 8), (True, 16 / math.sqrt(8))])
def test_scale_is_alpha_over_r_or_sqrt_r(rslora, expected):
    assert lorafit.LoraConfig(r=8, alpha=16, rslora=rslora).scale == pytest.approx(expected)


def test_lora_linear_keeps_weight_and_bias_objects_and_adds_update():
    base = nn.Linear(6, 4)
    layer = LoraLinear(base)
    assert layer.weight is base.weight and layer.bias is base.bias
    layer.add_adapter("a", r=2, scale=0.5, dropout=0.0, init="kaiming")
    layer.active = "a"
    nn.init.normal_(layer.lora["a"].lora_B)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer.double()
    expected = x @ (base.weight + 0.5 * layer.lora["a"].lora_B @ layer.lora["a"].lora_A).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_conv1d_layer_matches_transposed_linear_maths():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(nf=5, nx=3)  # weight (in=3, out=5)
    nn.init.normal_(base.bias)
    x = torch.randn(2, 4, 3)
    layer = LoraLinear(base, fan_in_fan_out=True)
    assert torch.equal(layer(x), base(x))  # bit for bit before any update
    layer.add_adapter("a", r=2, scale=1.0, dropout=0.0, init="kaiming")
    layer.active = "a"
    nn.init.normal_(layer.lora["a"].lora_B)
    expected = x @ (base.weight + layer.delta_weight("a")) + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_embedding_update_is_a_zero_start_and_matches_dense_delta():
    base = nn.Embedding(10, 4, padding_idx=0)
    layer = LoraEmbedding(base)
    layer.add_adapter("a", r=2, scale=2.0, dropout=0.0, init="kaiming")
    layer.active = "a"
    ids = torch.tensor([[0, 3, 9]])
    assert torch.equal(layer(ids), base(ids))
    nn.init.normal_(layer.lora["a"].lora_embedding_A)
    dense = base.weight + layer.delta_weight("a")  # (vocab, dim)
    torch.testing.assert_close(layer(ids), dense[ids])


def test_fp32_adapter_on_bf16_base_returns_base_dtype():
    layer = LoraLinear(nn.Linear(8, 8).to(torch.bfloat16))
    layer.add_adapter("a", r=2, scale=1.0, dropout=0.0, init="kaiming")
    layer.active = "a"
    assert layer.lora["a"].lora_A.dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_to_base_rebuilds_the_original_module_type():
    from transformers.pytorch_utils import Conv1D

    for base, kind in [(nn.Linear(3, 2), False), (Conv1D(2, 3), True)]:
        plain = LoraLinear(base, fan_in_fan_out=kind).to_base()
        assert type(plain) is type(base) and plain.weight is base.weight
        x = torch.randn(1, 3)
        assert torch.equal(plain(x), base(x))
    emb = nn.Embedding(5, 2, padding_idx=1)
    plain = LoraEmbedding(emb).to_base()
    assert plain.padding_idx == 1 and plain.weight is emb.weight
