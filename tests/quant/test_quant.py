"""Quantized frozen bases (lorafit.quant): the quantized layer, LoRA on top, files, training, merging, and the
embedding table with a head tied to it (each format against its reference: test_bnb.py, test_gguf.py)."""

import pytest
import torch
from torch import nn

import lorafit
from lorafit.quant import QuantLinear, model_bytes, quantize_model, quantized_weights
from lorafit.quant.bnb import Int8Weight, NF4Weight
from lorafit.quant.gguf import GGUFError, GGUFWeight
from tests.conftest import (
    gaussian,
    randomize_lora,
    run_cli,
    tiny_job,
    tiny_llama,
    tiny_run_config,
    tiny_run_yaml,
    tiny_tokenizer,
)

# --- the quantized layer ---

@pytest.mark.parametrize("make", [NF4Weight, Int8Weight])
def test_quant_linear_output_is_x_times_dequantized_weight(make):
    w, b, x = gaussian((64, 128)), gaussian((64,), seed=1), gaussian((3, 5, 128), seed=2)
    layer = QuantLinear(make(w), b)
    reference = x @ layer.weight.dequantize(torch.float32).T + b
    torch.testing.assert_close(layer(x), reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = layer(x)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), reference, atol=0.3, rtol=0.02)


def test_backward_gives_the_input_gradient_and_none_to_the_base():
    w, x = gaussian((64, 128)), gaussian((4, 128), seed=2).requires_grad_()
    layer = QuantLinear(NF4Weight(w), None)
    (layer(x) ** 2).sum().backward()
    dense = layer.weight.dequantize(torch.float32)
    x2 = x.detach().clone().requires_grad_()
    ((x2 @ dense.T) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not any(t.requires_grad for t in layer.parameters()) and all(b.grad is None for b in layer.buffers())


# --- a whole model ---

def test_quantize_model_touches_only_the_blocks_linears():
    model = tiny_llama()
    done = quantize_model(model, "nf4")
    names = {name for name, _ in quantized_weights(model)}
    assert len(done) == 2 * 7 and names == {f"{n}.weight" for n in done}  # q k v o gate up down, 2 blocks
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model_bytes(model) < model_bytes(tiny_llama())


def test_quantize_refuses_bad_requests():
    model = tiny_llama()
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_model(model, "nf3")
    with pytest.raises(GGUFError, match="needs a model loaded from a .gguf"):
        quantize_model(model, "gguf")
    lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(ValueError, match="before injecting adapters"):
        quantize_model(model, "nf4")


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_lora_on_a_quantized_base_matches_the_dense_dequantized_model(method, ids):
    """Same loss and same LoRA gradients as a dense fp32 model holding the dequantized weights; base untouched."""
    quant = tiny_llama()
    quantize_model(quant, method)
    dense = tiny_llama()
    with torch.no_grad():
        for name, weight in quantized_weights(quant):
            dense.get_parameter(name).copy_(weight.dequantize(torch.float32))
    cfg = lorafit.LoraConfig(r=4, targets="all-linear")
    for model in (quant, dense):
        lorafit.inject(model, cfg)
        randomize_lora(model)
        model.train()
    losses = [m(input_ids=ids, labels=ids).loss for m in (quant, dense)]
    torch.testing.assert_close(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    grads = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    for name, param in quant.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-4)
    assert all(b.grad is None for _, w in quantized_weights(quant) for b in w.buffers())


def test_adapter_from_a_quantized_base_loads_onto_the_dense_base(tmp_path, ids):
    quant = tiny_llama()
    quantize_model(quant, "nf4")
    lorafit.inject(quant, lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize_lora(quant)
    lorafit.save_adapter(quant, tmp_path / "adapter")
    dense = tiny_llama()
    lorafit.load_adapter(dense, tmp_path / "adapter")
    ours = {n: p for n, p in quant.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in dense.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    back = tiny_llama()  # and the other way round
    quantize_model(back, "nf4")
    lorafit.load_adapter(back, tmp_path / "adapter")
    torch.testing.assert_close(back(ids).logits, quant(ids).logits)


def test_merge_on_a_quantized_base_gives_dense_dequantized_weights_plus_delta(ids):
    model = tiny_llama()
    quantize_model(model, "nf4")
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets=["q_proj", "o_proj"]))
    randomize_lora(model)
    layer = model.model.layers[0].self_attn.q_proj
    expected = layer.weight.dequantize() + layer.delta_weight("default")
    unmerged = model(ids).logits
    lorafit.merge(model)
    assert isinstance(layer.weight, nn.Parameter) and torch.equal(layer.weight, expected)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-4, rtol=1e-4)
    lorafit.unload(model, merge_first=False)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # merged: a plain dense Linear
    assert type(model.model.layers[0].self_attn.k_proj) is QuantLinear  # never wrapped: still quantized
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-4, rtol=1e-4)


def test_unload_without_merge_keeps_the_quantized_layers(ids):
    model = tiny_llama()
    quantize_model(model, "int8")
    before = model(ids).logits
    lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["v_proj"]))
    lorafit.unload(model, merge_first=False)
    assert type(model.model.layers[1].self_attn.v_proj) is QuantLinear
    assert torch.equal(model(ids).logits, before)


# --- training and merging on a quantized base ---

def test_run_config_validates_quantize():
    from lorafit.core.config import ConfigError
    from lorafit.training.config import load_run_config

    base = ["--data.train", "x.jsonl"]
    assert load_run_config(None, [*base, "--model.quantize", "nf4"]).model.quantize == "nf4"
    with pytest.raises(ConfigError, match="--model.quantize: must be one of none, nf4, int8, gguf"):
        load_run_config(None, [*base, "--model.quantize", "fp4"])
    with pytest.raises(ConfigError, match="method full trains base weights"):
        load_run_config(None, [*base, "--model.quantize", "nf4", "--method", "full"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_an_nf4_base_learns_and_reports_its_memory(tmp_path, monkeypatch, precision):
    from lorafit.training.recipe import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tmp_path, model = tiny_job(tmp_path)
    report = train(tiny_run_config(tmp_path, model, tmp_path / "q", "--train.steps", "12", "--model.quantize", "nf4",
                                   "--train.precision", precision), log=lambda _: None)
    dense = train(tiny_run_config(tmp_path, model, tmp_path / "d", "--train.steps", "1", "--train.precision",
                                  precision), log=lambda _: None)
    assert report["quantize"] == "nf4" and report["model_bytes"] < dense["model_bytes"]
    assert report["tuned"]["loss"] < report["base"]["loss"]
    loaded = tiny_llama()  # the adapter loads onto the plain dense base
    lorafit.load_adapter(loaded, tmp_path / "q" / "adapter")


@pytest.mark.slow
def test_cli_trains_on_nf4_and_merges_into_the_dequantized_base(tmp_path):
    """`lorafit train --quantize nf4`, then `lorafit merge --quantize nf4`: a plain folder equal to dequant + BA."""
    from transformers import AutoModelForCausalLM

    config = tiny_run_yaml(tmp_path)
    done = run_cli("train", str(config), "--quantize", "nf4", "--train.lr", "1e-2", "--eval.max_new_tokens", "2")
    assert done.returncode == 0 and "quantize: nf4: 14 weights quantized" in done.stderr, done.stderr
    adapter = tmp_path / "run" / "adapter"
    done = run_cli("merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--quantize", "nf4")
    assert done.returncode == 0 and "nf4 base weights dequantized" in done.stderr, done.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    net = tiny_llama()  # the same random weights the saved folder holds
    quantize_model(net, "nf4")
    lorafit.load_adapter(net, adapter)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, net(ids).logits, atol=1e-4, rtol=1e-4)
    done = run_cli("merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged-emb"), "--quantize", "nf4",
                   "--quantize-embeddings")  # the base as a run with model.quantize_embeddings trained on
    assert done.returncode == 0, done.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-emb", dtype=torch.float32).eval()
    net = tiny_llama()
    quantize_model(net, "nf4", embeddings=True)
    emb = net.get_input_embeddings()
    assert type(emb) is not torch.nn.Embedding  # quantized: the merged table holds its dequantized values
    torch.testing.assert_close(merged.get_input_embeddings().weight, emb.weight.dequantize())
    done = run_cli("merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged-bad"), "--quantize-embeddings")
    assert done.returncode == 2 and "needs quantize: nf4, int8 or gguf" in done.stderr, done.stderr
    done = run_cli("train", str(config), "--quantize", "nf4", "--method", "full")
    assert done.returncode == 2 and "method full trains base weights" in done.stderr


def test_the_head_is_quantized_only_when_asked_and_never_a_tied_one(ids):
    model = tiny_llama()  # an untied head
    before = model(ids).logits
    done = quantize_model(model, "int8", head=True)
    assert type(model.lm_head) is QuantLinear and done["lm_head"] == "int8"
    torch.testing.assert_close(model(ids).logits, before, atol=0.05, rtol=0.05)
    tied = tiny_llama()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="shares its weight with the input embedding"):
        quantize_model(tied, "nf4", head=True)
    assert quantized_weights(tied) == []  # refused before anything changed
    from lorafit.core.config import ConfigError
    from lorafit.training.config import load_run_config

    with pytest.raises(ConfigError, match="--model.quantize_head: needs quantize: nf4 or int8"):
        load_run_config(None, ["--data.train", "x.jsonl", "--model.quantize_head", "true"])


# --- the embedding table, and a head tied to it ---

@pytest.mark.parametrize(("make", "cols"), [
    (NF4Weight, 128),  # whole blocks of 64 per row: only the rows asked for are dequantized
    (NF4Weight, 96),  # blocks cross rows: rows() falls back to dequantizing the whole weight
    (Int8Weight, 128),
    (lambda w: gguf_weight(w, "Q8_0"), 128),
])
def test_rows_dequantizes_exactly_the_rows_asked_for(make, cols):
    w = gaussian((40, cols))
    weight = make(w)
    index = torch.tensor([7, 0, 39, 7, 12])
    for dtype in (None, torch.bfloat16):
        assert torch.equal(weight.rows(index, dtype), weight.dequantize(dtype)[index])


def gguf_weight(w: torch.Tensor, qtype: str) -> GGUFWeight:
    gguf_quants = pytest.importorskip("gguf.quants")
    raw = gguf_quants.quantize(w.numpy(), getattr(__import__("gguf").GGMLQuantizationType, qtype))
    return GGUFWeight(torch.from_numpy(raw), qtype, w.shape, w.dtype)


def tied_tiny_llama() -> nn.Module:
    model = tiny_llama()
    model.config.tie_word_embeddings = True  # as SmolLM2 and GPT-2: one table for input and output
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_embeddings_keep_a_tied_head_tied_and_equal_the_dequantized_model(method, ids):
    from lorafit.quant import QuantEmbedding

    model = tied_tiny_llama()
    dense_bytes = model_bytes(model)
    done = quantize_model(model, method, embeddings=True)
    embed, head = model.model.embed_tokens, model.lm_head
    assert type(embed) is QuantEmbedding and type(head) is QuantLinear and head.weight is embed.weight
    assert done["model.embed_tokens"] == method and done["lm_head"].endswith("(tied to model.embed_tokens)")
    assert model_bytes(model) < 0.4 * dense_bytes  # the shared table counts once
    reference = tied_tiny_llama()  # dense, holding every dequantized weight
    with torch.no_grad():
        for name, weight in quantized_weights(model):
            reference.get_parameter(name).copy_(weight.dequantize())
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    untied = tiny_llama()
    quantize_model(untied, method, embeddings=True)
    assert type(untied.model.embed_tokens) is QuantEmbedding and type(untied.lm_head) is nn.Linear


def test_fast_loss_dequantizes_a_quantized_head(ids):
    from lorafit.training.loss import causal_lm_loss, output_layer

    model = tied_tiny_llama()
    quantize_model(model, "nf4", embeddings=True)
    lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    randomize_lora(model)
    assert output_layer(model) is not None  # the chunked loss, not the model's own forward
    labels = ids.clone()
    labels[:, :4] = -100
    fast = causal_lm_loss(model, {"input_ids": ids, "labels": labels})
    torch.testing.assert_close(fast, model(input_ids=ids, labels=labels).loss)


def test_lora_refuses_a_quantized_embedding_with_a_hint():
    model = tied_tiny_llama()
    quantize_model(model, "nf4", embeddings=True)
    with pytest.raises(lorafit.TargetError, match="packed \\(quantized\\): leave it unpacked"):
        lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["embed_tokens"]))
    from lorafit.core.config import ConfigError
    from lorafit.training.config import load_run_config

    with pytest.raises(ConfigError, match="--model.quantize_embeddings: needs quantize"):
        load_run_config(None, ["--data.train", "x.jsonl", "--model.quantize_embeddings", "true"])


def test_dequantize_model_gives_plain_modules_and_keeps_ties(ids):
    from lorafit.quant import dequantize_model

    model = tied_tiny_llama()
    quantize_model(model, "nf4", embeddings=True)
    before = model(ids).logits
    dequantize_model(model)
    assert not quantized_weights(model) and type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(".packed" not in k and ".absmax" not in k for k in model.state_dict())
    torch.testing.assert_close(model(ids).logits, before)


def test_merging_an_adapter_on_some_modules_writes_a_plain_dense_folder(tmp_path, ids):
    """Modules the adapter does not touch are still quantized after unload; the saved folder holds them dense."""
    from transformers import AutoModelForCausalLM

    from lorafit.models import save_merged

    model = tied_tiny_llama()
    quantize_model(model, "nf4", embeddings=True)
    lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["q_proj"]))
    randomize_lora(model)
    expected = model(ids).logits
    save_merged(model, tiny_tokenizer(), tmp_path / "merged")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(loaded.eval()(ids).logits, expected, atol=1e-4, rtol=1e-4)
