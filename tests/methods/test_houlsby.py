"""Houlsby adapters on real transformers architectures, checked against plain float64 arithmetic."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafit.methods.houlsby import (
    MethodError,
    add_houlsby,
    houlsby_parameter_count,
    houlsby_targets,
    remove_houlsby,
)
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
EXPECTED = {  # arch -> (targets in block 0, hidden size d, layers)
    "llama": (["model.layers.0.self_attn", "model.layers.0.mlp"], 64, 2),
    "gpt2": (["transformer.h.0.attn", "transformer.h.0.mlp"], 32, 2),
    "bert": (["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"], 32, 2),
}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Non-zero values in every adapter parameter (a trained-looking adapter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".houlsby." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def reference(adapter: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """h + W_up · gelu(W_down · h + b_down) + b_up in float64, with the exact (erf) GELU written out."""
    w_down, b_down = adapter.down.weight.double(), adapter.down.bias.double()
    w_up, b_up = adapter.up.weight.double(), adapter.up.bias.double()
    hd = h.double()
    z = hd @ w_down.T + b_down  # (..., m)
    return hd + (0.5 * z * (1 + torch.erf(z / 2**0.5))) @ w_up.T + b_up  # (..., d)


def first_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("arch", BUILDERS)
def test_default_targets_are_attention_and_mlp_outputs_of_every_block(arch):
    block0, _, layers = EXPECTED[arch]
    paths = houlsby_targets(BUILDERS[arch]())
    assert len(paths) == 2 * layers
    assert paths[:2] == block0


@pytest.mark.parametrize("arch", BUILDERS)
def test_zero_up_projection_gives_base_logits_bit_for_bit(arch, ids):
    model = BUILDERS[arch]()
    base = logits(model, ids)
    add_houlsby(model, bottleneck=8)
    assert torch.count_nonzero(model.get_submodule(EXPECTED[arch][0][0]).houlsby.down.weight) > 0  # small, not 0
    assert torch.equal(logits(model, ids), base)


@pytest.mark.parametrize("arch", BUILDERS)
def test_hooked_sublayer_output_is_h_plus_up_gelu_down_h(arch, ids):
    model = BUILDERS[arch]()
    paths = houlsby_targets(model)
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    for path in paths:  # registered first, so it sees the sublayer's own output h
        model.get_submodule(path).register_forward_hook(lambda m, a, out, p=path: seen[p].append(first_hidden(out)))
    add_houlsby(model, bottleneck=8)
    randomize(model)
    for path in paths:  # registered after the adapter's hook, so it sees the adapted output
        model.get_submodule(path).register_forward_hook(lambda m, a, out, p=path: seen[p].append(first_hidden(out)))
    adapted = logits(model, ids)
    for path in paths:
        h, out = seen[path]
        expected = reference(model.get_submodule(path).houlsby, h)  # (B, T, d)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        assert (out - h).abs().max() > 1e-3  # the adapter really moved the hidden state
    remove_houlsby(model)
    assert not torch.allclose(adapted, logits(model, ids))  # and the model output with it


@pytest.mark.parametrize("arch", BUILDERS)
def test_base_state_dict_keys_unchanged_and_base_checkpoint_loads(arch):
    base = BUILDERS[arch]()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = BUILDERS[arch](seed=1)  # other weights: loading must overwrite them
    add_houlsby(model, bottleneck=4)
    keys = set(model.state_dict())
    new = keys - set(base_state)
    assert set(base_state) <= keys and new and all(".houlsby." in k for k in new)
    assert len(new) == 4 * len(houlsby_targets(base))  # down/up weight and bias per adapter
    result = model.load_state_dict(base_state, strict=False)
    assert set(result.missing_keys) == new and result.unexpected_keys == []
    for key, value in base_state.items():
        assert torch.equal(model.state_dict()[key], value)
    model.load_state_dict(model.state_dict(), strict=True)  # the full state dict round-trips strictly


@pytest.mark.parametrize("arch", BUILDERS)
def test_remove_restores_module_tree_hooks_and_outputs_exactly(arch, ids):
    model = BUILDERS[arch]()
    tree = [(n, type(m)) for n, m in model.named_modules()]
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    keys, base = list(model.state_dict()), logits(model, ids)
    add_houlsby(model, bottleneck=8)
    randomize(model)
    copied = copy.deepcopy(model)  # the hooks travel with a copy, and come off it too
    assert not torch.equal(logits(copied, ids), base)
    for net in (model, copied):
        remove_houlsby(net)
        assert [(n, type(m)) for n, m in net.named_modules()] == tree
        assert sum(len(m._forward_hooks) for m in net.modules()) == hooks
        assert list(net.state_dict()) == keys
        assert torch.equal(logits(net, ids), base)
    add_houlsby(model, bottleneck=8)  # and adapters can be added again afterwards
    remove_houlsby(model)
    remove_houlsby(model)  # a no-op without adapters


@pytest.mark.parametrize("arch", BUILDERS)
def test_gradients_reach_only_adapter_parameters_when_base_is_frozen(arch, ids):
    model = BUILDERS[arch]()
    model.requires_grad_(False)
    add_houlsby(model, bottleneck=8)
    randomize(model)
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        if ".houlsby." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("arch", BUILDERS)
def test_trainable_parameter_count_is_layers_times_targets_times_2dm_plus_d_plus_m(arch):
    model = BUILDERS[arch]()
    model.requires_grad_(False)
    m = 6
    paths = add_houlsby(model, bottleneck=m)
    _, d, layers = EXPECTED[arch]
    expected = layers * 2 * (2 * d * m + d + m)
    assert len(paths) == layers * 2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert houlsby_parameter_count(model) == expected


def test_adding_twice_is_refused_and_the_model_is_left_as_it_was():
    model = tiny_llama()
    add_houlsby(model, bottleneck=4)
    state = list(model.state_dict())
    with pytest.raises(MethodError, match="already has Houlsby adapters"):
        add_houlsby(model, bottleneck=4)
    assert list(model.state_dict()) == state


def test_bert_output_dense_target_does_not_catch_attention_output_dense():
    paths = houlsby_targets(tiny_bert(), ["output.dense"])
    assert paths == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Tower(nn.Module):
    """No known architecture: a list of residual MLP blocks."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_unknown_architecture_asks_for_targets_and_names_candidates():
    with pytest.raises(MethodError, match=r"pass `targets`.*fc1, fc2"):
        add_houlsby(Tower())
    with pytest.raises(MethodError, match="'fc3' matches no module.*fc1, fc2"):
        add_houlsby(Tower(), targets=["fc3"])


def test_explicit_targets_on_an_unknown_architecture():
    model = Tower()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x)
        assert add_houlsby(model, bottleneck=2, targets=["fc2"]) == ["blocks.0.fc2", "blocks.1.fc2"]
        assert torch.equal(model(x), base)
        randomize(model)
        b0, b1 = model.blocks
        h = b0.fc2(torch.relu(b0.fc1(x)))  # the hooked output, by hand: fc2 + its adapter
        h1 = x + h
        torch.testing.assert_close(model(x), h1 + b1.fc2(torch.relu(b1.fc1(h1))))
        plain = F.linear(torch.relu(b0.fc1(x)), b0.fc2.weight, b0.fc2.bias)  # fc2 without its hook
        torch.testing.assert_close(h.double(), reference(b0.fc2.houlsby, plain))


def test_adapter_follows_the_sublayer_dtype_unless_told():
    model = tiny_llama().to(torch.bfloat16)
    add_houlsby(model, bottleneck=4)
    assert {p.dtype for n, p in model.named_parameters() if ".houlsby." in n} == {torch.bfloat16}
    remove_houlsby(model)
    add_houlsby(model, bottleneck=4, dtype=torch.float32)
    assert {p.dtype for n, p in model.named_parameters() if ".houlsby." in n} == {torch.float32}


@pytest.mark.parametrize("autocast", [False, True])
def test_fp32_adapter_on_a_bf16_model_with_and_without_autocast(autocast, ids):
    """The bf16 training path: frozen base in bf16, trainable adapter in fp32."""
    model = tiny_llama().to(torch.bfloat16)
    base = logits(model, ids)
    add_houlsby(model, bottleneck=8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(logits(model, ids), base)  # zero W_up: still the base bit for bit
    # Outside the autocast block: autocast caches its bf16 copies of fp32 weights until the block ends.
    randomize(model)
    sublayer = model.model.layers[0].mlp
    seen = []
    sublayer.houlsby.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    sublayer.houlsby.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids).logits
        out.float().sum().backward()
    h, adapted = seen
    assert out.dtype == torch.bfloat16 and h.dtype == adapted.dtype == torch.bfloat16
    a = sublayer.houlsby
    expected = reference(a, h)
    # bf16 rounding of the output (values up to ~0.2; under autocast also of the products): about 1e-3 here.
    torch.testing.assert_close(adapted.double(), expected, rtol=1e-2, atol=3e-3)
    assert a.up.weight.grad is not None and a.up.weight.grad.dtype == torch.float32
