"""Prefix and prompt tuning (lorafit.methods.virtual) against independent references.

The references never use lorafit's input transform: a prompt initialised from vocabulary tokens v is exactly the
model reading the tokens cat(v, ids); a prefix set to the keys/values the model itself caches for a sequence S
is exactly the model reading cat(S, ids) (S occupies positions 0..n-1, so positions line up too).
"""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from lorafit.data import Example
from lorafit.inference.generate import stream
from lorafit.inference.scoring import accuracy, generate, mean_loss
from lorafit.methods import model_inputs
from lorafit.methods.select import MethodError
from lorafit.methods.virtual import (
    add_virtual_tokens,
    cache_argument,
    remove_virtual_tokens,
    virtual_inputs,
    virtual_tokens_of,
)
from lorafit.training.loop import loss_of
from lorafit.training.loss import output_layer
from lorafit.training.runtime import autocast, cast_frozen, prepare
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama

N = 4  # virtual tokens in these tests


def lively_gpt2() -> torch.nn.Module:
    """tiny_gpt2 with 10x position embeddings: its greedy output then depends on positions (at init scale it just
    repeats the last token), so a position mistake shows in generation."""
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(10)
    return model


CAUSAL = {"llama": tiny_llama, "gpt2": lively_gpt2}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One word per id of the tiny models' 128-token vocabulary: "<pad>" is 0, "w5" is 5."""
    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def right_padded(seed: int = 1) -> dict:
    """Two rows, the second 3 tokens shorter (right padding, as training batches are); token labels with the
    first label kept (a prompt's last virtual position predicts it) and some prompt-like -100s."""
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(seed))  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2:4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trainable(model: torch.nn.Module, kind: str, **options):
    """Add virtual tokens and leave the model as the training setup does: the base frozen, only they train."""
    model.requires_grad_(False)
    return add_virtual_tokens(model, kind, n=N, **options)


def set_prefix_from(model, seq: torch.Tensor) -> None:
    """Make the prefix exactly what the model caches for the token sequence `seq` (1, n)."""
    output = model(input_ids=seq, use_cache=True)
    cache = output.get("cache", output.get("past_key_values"))  # renamed in transformers 5.24
    virtual = virtual_tokens_of(model)
    with torch.no_grad():
        for i, layer in enumerate(cache.layers):
            virtual.keys[i].copy_(layer.keys[0])
            virtual.values[i].copy_(layer.values[0])


# --- prompt tuning ---

@pytest.mark.parametrize("arch", CAUSAL)
def test_prompt_from_vocab_is_the_model_reading_those_tokens_first(arch):
    model = CAUSAL[arch]()
    virtual = add_virtual_tokens(model, "prompt", n=N, seed=3)
    batch = right_padded()
    inputs, drop = virtual_inputs(model, batch)
    assert drop == N and inputs["inputs_embeds"].shape[:2] == (2, N + 9)
    assert_reads_tokens_first(model, inputs, drop, torch.tensor(virtual.init_tokens)[None], batch)


@pytest.mark.parametrize("arch", CAUSAL)
def test_prompt_loss_through_the_fast_path_equals_the_models_own_loss_on_hand_built_inputs(arch):
    model = CAUSAL[arch]()
    trainable(model, "prompt", seed=0)
    with torch.no_grad():  # a trained-looking prompt, no longer any token's embedding
        model.lorafit_virtual.prompt.add_(torch.randn(N, model.config.hidden_size) * 0.5)
    assert output_layer(model) is not None  # the chunked path, not the model's own forward
    batch = right_padded()
    embeds = torch.cat([model.lorafit_virtual.prompt[None].expand(2, -1, -1),
                        model.get_input_embeddings()(batch["input_ids"])], 1)  # (B, n + T, H)
    mask = torch.cat([torch.ones(2, N, dtype=torch.long), batch["attention_mask"]], 1)
    labels = torch.cat([torch.full((2, N), -100), batch["labels"]], 1)
    want = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    got = loss_of(model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert mean_loss(model, [Example(batch["input_ids"][0].tolist(), batch["labels"][0].tolist())], 1, 0) \
        == pytest.approx(loss_of(model, {k: x[:1] for k, x in batch.items()}).item(), rel=1e-6)


def test_prompt_on_a_bert_classifier_is_the_model_reading_the_vocab_tokens_first():
    model = tiny_bert()
    virtual = trainable(model, "prompt", seed=5)
    examples = [Example([2, 17, 30, 41, 3], 1), Example([2, 99, 3], 2), Example([2, 5, 6, 7, 8, 9, 3], 0)]
    v = virtual.init_tokens
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([v + e.input_ids])).logits[0] for e in examples]  # (C,) each
        batch = {"input_ids": torch.tensor([examples[0].input_ids]), "labels": torch.tensor([1])}
        torch.testing.assert_close(loss_of(model, batch), torch.nn.functional.cross_entropy(want[0][None], batch[
            "labels"]), atol=1e-5, rtol=0)
    right = sum(int(w.argmax()) == e.labels for w, e in zip(want, examples))
    assert accuracy(model, examples, batch_size=3, pad_id=0) == pytest.approx(100.0 * right / 3)


def assert_reads_tokens_first(model, inputs: dict, drop: int, tokens: torch.Tensor, batch: dict) -> None:
    """The model on `inputs` (virtual tokens) gives, at real positions, its logits on cat(tokens, ids)."""
    with torch.no_grad():
        got = model(**{k: x for k, x in inputs.items() if k != "labels"}).logits[:, drop:]  # (B, T, V)
        want = model(input_ids=torch.cat([tokens.expand(2, -1), batch["input_ids"]], 1),
                     attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), batch["attention_mask"]], 1)
                     ).logits[:, N:]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


# --- prefix tuning ---

@pytest.mark.parametrize("arch", CAUSAL)
def test_prefix_set_to_the_cache_of_S_gives_the_logits_of_the_model_on_S_then_ids(arch):
    model = CAUSAL[arch]()
    add_virtual_tokens(model, "prefix", n=N, init="random")
    seq = torch.randint(1, 128, (1, N), generator=torch.Generator().manual_seed(7))  # S
    set_prefix_from(model, seq)
    batch = right_padded()
    inputs, drop = virtual_inputs(model, batch)
    assert drop == 0 and inputs[cache_argument(model)].get_seq_length() == N
    assert_reads_tokens_first(model, inputs, drop, seq, batch)


@pytest.mark.parametrize("arch", CAUSAL)
def test_prefix_loss_through_the_fast_path_equals_the_model_on_S_then_ids(arch):
    model = CAUSAL[arch]()
    trainable(model, "prefix")
    seq = torch.randint(1, 128, (1, N), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        set_prefix_from(model, seq)
    batch = right_padded()
    labels = batch["labels"].clone()
    labels[:, 0] = -100  # a prefix has no output position that predicts the first token
    want = model(input_ids=torch.cat([seq.expand(2, -1), batch["input_ids"]], 1),
                 attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), batch["attention_mask"]], 1),
                 labels=torch.cat([torch.full((2, N), -100), labels], 1)).loss
    assert output_layer(model) is not None
    torch.testing.assert_close(loss_of(model, batch), want, atol=1e-5, rtol=1e-5)


# --- generation ---

@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", CAUSAL)
def test_greedy_generation_equals_generation_of_the_explicit_sequence_with_left_padding(arch, kind):
    model, tok = CAUSAL[arch](), word_tokenizer()
    prompts = ["w5 w9 w33 w7 w61", "w100 w3"]  # different lengths: the second is left-padded
    base = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    virtual = add_virtual_tokens(model, kind, n=N, seed=2)
    assert 0 not in virtual.init_tokens
    got = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    one_by_one = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    remove_virtual_tokens(model)
    want = generate(model, tok, [f"{words(virtual.init_tokens)} {p}" for p in prompts], max_new_tokens=6,
                    batch_size=2)
    assert got == want == one_by_one
    assert got != base  # the virtual tokens do change what is generated
    assert all(len(text.split()) >= 2 for text in got)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_stream_with_virtual_tokens_matches_generate(kind):
    model, tok = tiny_llama(), word_tokenizer()
    add_virtual_tokens(model, kind, n=N, seed=2)
    pieces: list[str] = []
    text = stream(model, tok, "w100 w3", max_new_tokens=6, on_text=pieces.append)
    assert text.split() == generate(model, tok, ["w100 w3"], max_new_tokens=6)[0].split()
    assert "".join(pieces) == text


# --- training behaviour, add / remove ---

@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", CAUSAL)
def test_gradients_reach_only_the_virtual_parameters(arch, kind):
    model = CAUSAL[arch]()
    trainable(model, kind)
    model.train()
    loss_of(model, right_padded()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is None for name, g in grads.items() if not name.startswith("lorafit_virtual."))
    virtual = {name: g for name, g in grads.items() if name.startswith("lorafit_virtual.")}
    assert virtual and all(g is not None and g.abs().sum() > 0 for g in virtual.values())


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_base_keys_are_untouched_and_remove_restores_outputs_exactly(kind, ids):
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits
    add_virtual_tokens(model, kind, n=N)
    extra = set(model.state_dict()) - set(base_state)
    assert set(base_state) <= set(model.state_dict()) and extra and all(k.startswith("lorafit_virtual.") for k in extra)
    assert set(model.load_state_dict(base_state, strict=False).missing_keys) == extra  # a base checkpoint loads
    assert remove_virtual_tokens(model) and not remove_virtual_tokens(model)
    assert virtual_inputs(model, {"input_ids": ids}) == ({"input_ids": ids}, 0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert list(model.state_dict()) == list(base_state)


def test_same_options_rebuild_the_same_virtual_tokens_and_shapes_follow_the_model():
    one, two = tiny_llama(), tiny_llama()
    a, b = add_virtual_tokens(one, "prefix", n=N, seed=4), add_virtual_tokens(two, "prefix", n=N, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert [tuple(k.shape) for k in a.keys] == [(2, N, 16)] * 2  # (kv_heads, n, head_dim) per layer (GQA: 2 heads)
    assert tuple(add_virtual_tokens(tiny_gpt2(), "prompt", n=N).prompt.shape) == (N, 32)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
def test_bf16_autocast_trains_fp32_virtual_parameters(arch, kind, base_dtype):
    model = CAUSAL[arch]()
    trainable(model, kind)
    batch = right_padded()
    exact = loss_of(model, batch).item()
    cast_frozen(model, base_dtype)
    model.train()
    with autocast("bf16", model):
        loss = loss_of(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(exact, rel=0.03)
    for param in virtual_tokens_of(model).parameters():
        assert param.dtype == param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0
    with autocast("bf16", model):  # and generation runs on the same path (evaluation under autocast)
        assert len(generate(model, word_tokenizer(), ["w5 w9", "w7"], max_new_tokens=3)) == 2


def test_prompt_trains_under_gradient_checkpointing_with_the_same_gradient():
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        trainable(model, "prompt")
        if checkpointing:
            prepare(model, "fp32", checkpointing=True)  # as training sets it up
        model.train()
        loss_of(model, right_padded()).backward()
        grads.append(model.lorafit_virtual.prompt.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# --- errors ---

def test_prefix_with_gradient_checkpointing_is_refused_in_training():
    model = tiny_llama()
    trainable(model, "prefix")
    prepare(model, "fp32", checkpointing=True)  # as training sets it up
    model.train()
    with pytest.raises(MethodError, match="checkpointing"):
        loss_of(model, right_padded())


def test_unsupported_models_and_options_are_refused_with_the_reason():
    with pytest.raises(MethodError, match=r"prefix.*BertForSequenceClassification \(bert\)"):
        add_virtual_tokens(tiny_bert(), "prefix", n=N)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_labels=2)
    with pytest.raises(MethodError, match="LlamaForSequenceClassification.*last non-padding token"):
        add_virtual_tokens(LlamaForSequenceClassification(cfg), "prompt", n=N)
    model = tiny_llama()
    add_virtual_tokens(model, "prompt", n=N)
    with pytest.raises(MethodError, match="already has virtual tokens"):
        add_virtual_tokens(model, "prefix", n=N)
    with pytest.raises(MethodError, match="kind must be one of"):
        add_virtual_tokens(tiny_llama(), "suffix")
    with pytest.raises(MethodError, match="positive integer"):
        add_virtual_tokens(tiny_llama(), "prompt", n=0)


def test_batches_follow_the_model_to_its_device():
    """Batches are built on the CPU; model_inputs hands them to the model on the model's device (here "meta",
    which needs no GPU), and leaves values that are not tensors alone."""
    model = tiny_llama().to("meta")
    ids = torch.tensor([[1, 2, 3]])
    inputs, drop = model_inputs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False})
    assert drop == 0 and inputs["use_cache"] is False
    assert inputs["input_ids"].device.type == "meta" and inputs["attention_mask"].device.type == "meta"
    model = tiny_llama()
    add_virtual_tokens(model, "prompt", n=N)
    inputs, drop = model_inputs(model.to("meta"), {"input_ids": ids})
    assert drop == N and inputs["inputs_embeds"].device.type == "meta"
