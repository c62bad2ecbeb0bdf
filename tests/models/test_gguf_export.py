"""GGUF export (lorafit.models.gguf_export, gguf_vocab, gguf_lora): merged models and LoRA adapters, checked by
llama.cpp itself (llama-cpp-python) against lorafit's own logits and greedy tokens."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import lorafit
from lorafit.core.adapter_io import read_adapter
from lorafit.models import ModelError, export_gguf, export_lora_gguf, load_config, load_model, resolve
from lorafit.models import gguf_export as ge
from lorafit.models import gguf_lora as gl
from lorafit.quant.gguf import rotary_rows
from tests.conftest import USER_CACHE, gaussian, randomize_lora, saved_tiny_bpe_llama, tiny_gpt2

pytestmark = pytest.mark.usefixtures("private_cache")
PROMPT = [{"role": "user", "content": "hello cat, 1 2 3"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama folder and two adapters on it (all-linear, non-zero B): plain LoRA r=4 and rsLoRA r=8."""
    root = tmp_path_factory.mktemp("gguf")
    folder = saved_tiny_bpe_llama(root / "model")
    for name, cfg in (("lora", lorafit.LoraConfig(r=4, alpha=8, targets="all-linear")),
                      ("rslora", lorafit.LoraConfig(r=8, alpha=4, rslora=True, targets=["q_proj", "k_proj", "v_proj",
                                                                                         "down_proj"]))):
        net, _ = load_model(str(folder))
        lorafit.inject(net, cfg)
        randomize_lora(net, seed=len(name))
        lorafit.save_adapter(net, root / name)
    return root


def lorafit_model(tiny, adapter: str | None):
    """(model with `adapter` loaded, or the base, tokenizer)."""
    net, tok = load_model(str(tiny / "model"))
    if adapter:
        lorafit.load_adapter(net, tiny / adapter)
    return net, tok


def prompt_ids(tok) -> list[int]:
    return tok(tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]


def llama(path, lora=None, n_ctx: int = 128):
    """llama.cpp on one thread with an fp32 KV cache (its default f16 cache would add ~1e-3 of error)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_threads=1,
                           logits_all=True, type_k=0, type_v=0, verbose=False)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])  # (T, vocab)


def llama_greedy(llm, ids: list[int], n: int, eos: int) -> list[int]:
    """n greedy tokens by arg-max over llama.cpp's own logits, stopping after eos as transformers does."""
    llm.reset()
    llm.eval(ids)
    out = []
    while len(out) < n and (not out or out[-1] != eos):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def torch_greedy(net, ids: list[int], n: int, tok) -> list[int]:
    with torch.no_grad():
        out = net.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def torch_logits(net, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return net(torch.tensor([ids])).logits[0].numpy()  # (T, vocab)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- layout and types, without llama.cpp ---

def test_llama_rows_undo_what_the_gguf_reader_does():
    for rows, heads in ((128, 4), (64, 2), (576, 9)):
        order = ge.llama_rows(rows, heads)
        assert torch.equal(order[rotary_rows(rows, heads)], torch.arange(rows))
        assert not torch.equal(order, torch.arange(rows))


def test_tensor_types_follow_llama_cpps_converter():
    t = ge.tensor_type
    assert t("blk.0.attn_norm.weight", (128,), "q4_0").name == "F32" and t("x.bias", (96,), "f16").name == "F32"
    assert t("blk.0.attn_q.weight", (128, 128), "bf16").name == "BF16"
    assert t("blk.0.ffn_down.weight", (128, 96), "q8_0").name == "Q8_0"
    assert t("blk.0.ffn_down.weight", (128, 100), "q8_0").name == "F16"  # rows not a multiple of 32
    assert t("blk.0.ffn_up.weight", (256, 128), "q4_0").name == "Q4_0"
    assert t("token_embd.weight", (320, 128), "q4_0").name == "Q8_0"  # the (tied) head keeps 8 bits
    with pytest.raises(ModelError, match="unknown GGUF type 'q5_k'; use one of f32, f16, bf16, q8_0, q4_0"):
        ge.check_file_type("q5_k")


def test_export_writes_llama_metadata_tokenizer_and_no_tied_head(tiny, tmp_path):
    from gguf import GGUFReader

    net, tok = lorafit_model(tiny, "lora")
    done = export_gguf(net, tok, tmp_path / "m.gguf", "q8_0")
    reader = GGUFReader(str(done["path"]))
    f = {key: field.contents() for key, field in reader.fields.items()}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.rope.dimension_count"]) == \
        (4, 2, 32)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5) and f["llama.vocab_size"] == 320
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert f["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1] and len(f["tokenizer.ggml.tokens"]) == 320
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.chat_template"] == tok.chat_template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == "Q8_0"
    assert types["blk.1.ffn_norm.weight"] == "F32" and types["blk.0.attn_k.weight"] == "Q8_0"
    assert done["types"] == {"F32": 5, "Q8_0": 15} and not list(tmp_path.glob(".*"))  # no temp file left


def test_refusals_are_clear(tiny, tmp_path):
    gpt2 = tiny_gpt2()
    with pytest.raises(ModelError, match="Llama-family .* this model is GPT2LMHeadModel"):
        gpt2.config.architectures = ["GPT2LMHeadModel"]
        export_gguf(gpt2, None, tmp_path / "g.gguf")
    (tmp_path / "there.gguf").write_bytes(b"old")
    net, tok = lorafit_model(tiny, None)
    with pytest.raises(ModelError, match="there.gguf: exists; pass --overwrite"):
        export_gguf(net, tok, tmp_path / "there.gguf")
    with pytest.raises(ModelError, match="must end in .gguf"):
        export_gguf(net, tok, tmp_path / "m.bin")
    assert (tmp_path / "there.gguf").read_bytes() == b"old"


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tiny, tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"old")
    monkeypatch.setattr(ge, "encode", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    net, tok = lorafit_model(tiny, None)
    with pytest.raises(OSError):
        export_gguf(net, tok, tmp_path / "m.gguf", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == b"old"


def test_adapters_llama_cpp_cannot_apply_are_refused(tiny, tmp_path):
    config = load_config(str(tiny / "model"))
    net, _ = load_model(str(tiny / "model"))
    lorafit.inject(net, lorafit.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"], bias="lora_only"))
    lorafit.save_adapter(net, tmp_path / "extra")
    with pytest.raises(ModelError, match="extra: modules_to_save=\\['lm_head'\\] trains whole modules.*--lora-only"):
        export_lora_gguf(tmp_path / "extra", config, tmp_path / "a.gguf")
    net, _ = load_model(str(tiny / "model"))
    lorafit.inject(net, lorafit.LoraConfig(r=2, targets=["embed_tokens"]))
    lorafit.save_adapter(net, tmp_path / "embedding")
    with pytest.raises(ModelError, match="embed_tokens.lora_embedding_A is LoRA on an embedding table"):
        export_lora_gguf(tmp_path / "embedding", config, tmp_path / "a.gguf")
    with pytest.raises(ModelError, match="written as f32, f16, bf16, not 'q8_0'"):
        export_lora_gguf(tiny / "lora", config, tmp_path / "a.gguf", "q8_0")
    cfg, tensors = read_adapter(tiny / "lora")
    cfg.variant = "dora"  # what a DoRA adapter reads as; the merged export folds its magnitudes in instead
    with pytest.raises(ModelError, match="DoRA.*export the merged model instead"):
        gl.lora_updates(cfg, tensors, tiny / "lora")
    assert not (tmp_path / "a.gguf").exists()


def test_per_module_scales_fold_into_lora_b_exactly(tiny):
    """alpha_pattern gives the MLP another scale than attention; llama.cpp's file has one alpha, so the MLP's
    difference goes into its lora_b."""
    cfg, tensors = read_adapter(tiny / "lora")
    cfg = dataclasses.replace(cfg, alpha=2.0, alpha_pattern={"gate_proj|up_proj|down_proj": 8.0})
    modules = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    scales = {m: cfg.scale_of(m) for m in modules}
    assert set(scales.values()) == {0.5, 2.0}
    updates, alpha = gl.lora_updates(cfg, tensors, tiny / "lora")
    assert alpha == 0.5 * 4  # the most common scale (attention: 8 of 14 modules) times r keeps its B unchanged
    for module, scale in scales.items():
        a, b = updates[ge.llama_name(module + ".weight")]
        want = scale * tensors[module + ".lora_B.weight"] @ tensors[module + ".lora_A.weight"]
        torch.testing.assert_close(alpha / a.shape[0] * b @ a, want, rtol=1e-6, atol=1e-7)


# --- checked by llama.cpp ---

@pytest.mark.llama
@pytest.mark.parametrize("tied", [True, False])
def test_merged_f32_export_gives_lorafits_logits_and_greedy_tokens_in_llama_cpp(tiny, tmp_path, tied):
    folder = tiny / "model" if tied else saved_tiny_bpe_llama(tmp_path / "untied", tied=False)
    net, tok = load_model(str(folder))
    lorafit.load_adapter(net, tiny / "lora")
    ids = prompt_ids(tok)
    want, greedy = torch_logits(net, ids), torch_greedy(net, ids, 16, tok)
    path = export_gguf(net, tok, tmp_path / "m.gguf")["path"]
    llm = llama(path)
    assert llm.tokenize(tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False).encode(),
                        add_bos=False, special=True) == ids  # llama.cpp's tokenizer splits as transformers does
    assert relative_error(llama_logits(llm, ids), want) < 1e-4
    assert llama_greedy(llm, ids, 16, tok.eos_token_id) == greedy


@pytest.mark.llama
@pytest.mark.parametrize("adapter", ["lora", "rslora"])
def test_gguf_lora_applied_by_llama_cpp_equals_lorafits_adapter_model(tiny, tmp_path, adapter):
    net, tok = lorafit_model(tiny, adapter)
    ids = prompt_ids(tok)
    want, greedy = torch_logits(net, ids), torch_greedy(net, ids, 16, tok)
    base = export_gguf(load_model(str(tiny / "model"))[0], tok, tmp_path / "base.gguf")["path"]
    done = export_lora_gguf(tiny / adapter, load_config(str(tiny / "model")), tmp_path / "a.gguf")
    assert done["alpha"] == (8.0 if adapter == "lora" else pytest.approx(4 * 8**0.5))
    llm = llama(base, lora=done["path"])
    assert relative_error(llama_logits(llm, ids), want) < 1e-4
    assert llama_greedy(llm, ids, 16, tok.eos_token_id) == greedy
    with lorafit.disabled(net):  # the adapter does change the output: the check above could fail
        assert relative_error(llama_logits(llm, ids), torch_logits(net, ids)) > 1e-2


def file_weights_model(path, like):
    """A copy of plain model `like` holding the weights GGUF file `path` stores, dequantized by the gguf package
    (block maths independent of llama.cpp and of lorafit) and put back in transformers' row order."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model = lorafit.unload(copy.deepcopy(like))
    state, cfg = model.state_dict(), model.config
    keys = {ge.llama_name(key): key for key in state}
    with torch.no_grad():
        for t in GGUFReader(str(path)).tensors:
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(state[keys[t.name]].shape)
            if t.name.endswith(("attn_q.weight", "attn_k.weight")):
                w = w[rotary_rows(w.shape[0], cfg.num_attention_heads if "attn_q" in t.name else 2)]
            state[keys[t.name]].copy_(w)
    return model


@pytest.mark.llama
@pytest.mark.parametrize("file_type, bound", [("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 0.1), ("q4_0", 0.1)])
def test_smaller_types_run_in_llama_cpp_as_their_stored_weights_do(tiny, tmp_path, file_type, bound):
    """llama.cpp's logits against the same model holding the file's (rounded) weights in fp32 torch: what is left
    is llama.cpp's own rounding of activations (f16, or 8-bit blocks for Q8_0 / Q4_0 products). A misplaced or
    mislabelled tensor would be off by the size of the logits."""
    net, tok = lorafit_model(tiny, "lora")
    ids = prompt_ids(tok)
    want = torch_logits(net, ids)
    done = export_gguf(copy.deepcopy(net), tok, tmp_path / f"m-{file_type}.gguf", file_type)
    got = llama_logits(llama(done["path"]), ids)
    stored = torch_logits(file_weights_model(done["path"], net), ids)
    print(f"{file_type}: max |logit error| / max |logit|: llama.cpp vs f32 {relative_error(got, want):.2e}, "
          f"stored weights vs f32 {relative_error(stored, want):.2e}, llama.cpp vs stored weights "
          f"{relative_error(got, stored):.2e}; {done['bytes']:,} bytes")
    assert relative_error(got, stored) < bound and relative_error(stored, want) > 1e-4  # the file is rounded


def test_lora_only_export_checks_the_base_is_llama(tmp_path):
    gpt2 = tiny_gpt2()
    lorafit.inject(gpt2, lorafit.LoraConfig(r=2, targets=["c_attn"]))
    lorafit.save_adapter(gpt2, tmp_path / "a")
    with pytest.raises(ModelError, match="this model is gpt2"):
        export_lora_gguf(tmp_path / "a", gpt2.config, tmp_path / "a.gguf")


# --- the real preset ---

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?",
           "Give me three tips for sleeping well.", "What is 2024 + 365?"]


@pytest.mark.slow
@pytest.mark.llama
def test_real_preset_exports_give_lorafits_greedy_tokens_in_llama_cpp(tmp_path, monkeypatch):
    """SmolLM2 with a LoRA adapter on every block Linear: the merged f32 export and the f32 base plus the GGUF
    LoRA adapter each generate lorafit's 32 greedy tokens on 5 chat prompts, tokenized alike by llama.cpp."""
    from lorafit.models.gguf_vocab import built_tokenizer_fields, copied_tokenizer_fields

    monkeypatch.setenv("LORAFIT_CACHE", str(USER_CACHE))
    net, tok = load_model("smollm2-135m-instruct")  # ~25 s on 2 cores
    gguf_file = Path(resolve("smollm2-135m-instruct")[0]) / resolve("smollm2-135m-instruct")[1]
    base = export_gguf(copy.deepcopy(net), tok, tmp_path / "base.gguf", tokenizer_gguf=gguf_file)["path"]
    lorafit.inject(net, lorafit.LoraConfig(r=8, alpha=16, targets="all-linear"))
    with torch.no_grad():
        for i, (_, layer) in enumerate(lorafit.lora_layers(net)):
            layer.lora["default"].lora_B.copy_(gaussian(layer.lora["default"].lora_B.shape, seed=i) * 2e-2)
    lorafit.save_adapter(net, tmp_path / "adapter")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    want = [torch_greedy(net, ids, 32, tok) for ids in prompts]
    with lorafit.disabled(net):
        assert [torch_greedy(net, ids, 32, tok) for ids in prompts] != want  # the adapter changes the answers
    merged = export_gguf(net, tok, tmp_path / "merged.gguf", tokenizer_gguf=gguf_file)["path"]
    lora = export_lora_gguf(tmp_path / "adapter", load_config("smollm2-135m-instruct"), tmp_path / "a.gguf")["path"]
    for llm in (llama(merged, n_ctx=256), llama(base, lora=lora, n_ctx=256)):
        assert [llm.tokenize(text.encode(), add_bos=True, special=True) for text in texts] == prompts
        assert [llama_greedy(llm, ids, 32, tok.eos_token_id) for ids in prompts] == want
    built, copied = ({f.key: f.value for f in fields} for fields in
                     (built_tokenizer_fields(tok, 49152), copied_tokenizer_fields(gguf_file)))
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "add_bos_token"):
        assert built[f"tokenizer.ggml.{key}"] == copied[f"tokenizer.ggml.{key}"], key
    assert built["tokenizer.chat_template"] == copied["tokenizer.chat_template"]
