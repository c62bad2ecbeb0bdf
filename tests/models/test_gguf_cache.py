"""Dense copies of GGUF models (lorafit.models.gguf_cache): a load from the copy gives the model and tokenizer a
load from the GGUF file gives, bit for bit; a damaged copy is converted again; a failed conversion leaves nothing.

The reference is always transformers' own load of the GGUF file, with the cache switched off."""

import json
import warnings

import numpy as np
import pytest
import torch
import transformers

import lorafit
from lorafit.models import gguf_cache as gc
from lorafit.models import load as ml
from lorafit.quant import quantized_weights
from tests.conftest import USER_CACHE

pytestmark = pytest.mark.usefixtures("private_cache")

TEXTS = ["abcd ab", "cd  x3 ba\n", "<s>ab</s> zz"]
CHAT = [{"role": "user", "content": "ab cd"}, {"role": "assistant", "content": "dc"}]


def tiny_llama_gguf(path, seed=0, vocab=64, hidden=32, ff=64, layers=2, heads=4, kv=2):
    """A complete tiny Llama GGUF file: random fp32 embeddings and norms, Q8_0 block weights, a byte-level BPE
    tokenizer with a chat template; transformers loads it like any GGUF model."""
    import gguf  # the GGUF writer: only these tests need it

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny"), w.add_block_count(layers), w.add_context_length(64), w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff), w.add_head_count(heads), w.add_head_count_kv(kv), w.add_vocab_size(vocab)
    w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0)
    letters = [chr(ord("a") + i) for i in range(26)]
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_merges(["a b", "c d"])
    w.add_token_list(["<unk>", "<s>", "</s>", *letters, "Ġ", "ab", "cd", *(f"x{i}" for i in range(vocab - 32))])
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}")

    def tensor(name, *shape, blocks=False):
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        q8 = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name, gguf.quants.quantize(x, q8), raw_dtype=q8) if blocks else w.add_tensor(name, x)

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden), tensor(f"blk.{i}.ffn_norm.weight", hidden)
        for name, rows, cols in [("attn_q", hidden, hidden), ("attn_k", kv * hidden // heads, hidden),
                                 ("attn_v", kv * hidden // heads, hidden), ("attn_output", hidden, hidden),
                                 ("ffn_gate", ff, hidden), ("ffn_up", ff, hidden), ("ffn_down", hidden, ff)]:
            tensor(f"blk.{i}.{name}.weight", rows, cols, blocks=True)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def uncached(monkeypatch, *args, **kwargs):
    """load_model with the cache switched off: transformers' own conversion of the GGUF file."""
    with monkeypatch.context() as m:
        m.setenv(gc.SWITCH, "0")
        return ml.load_model(*args, **kwargs)


def copies():
    root = gc.cache_dir() / "converted"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.to_dict() == b.config.to_dict()  # incl. _name_or_path: the GGUF file's folder
    assert a.name_or_path == b.name_or_path and type(a) is type(b)
    gen = [m.generation_config.to_dict() if getattr(m, "generation_config", None) else None for m in (a, b)]
    assert gen[0] == gen[1]


def assert_same_tokenizer(a, b, tmp_path):
    assert a.name_or_path == b.name_or_path and a.special_tokens_map == b.special_tokens_map
    assert a.pad_token_id == b.pad_token_id is not None and a.get_vocab() == b.get_vocab()
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"]
        assert a.decode(a(text)["input_ids"]) == b.decode(b(text)["input_ids"])
    for prompt in (False, True):
        assert a.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt) == \
            b.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
    a.save_pretrained(tmp_path / "a"), b.save_pretrained(tmp_path / "b")  # what a merged model folder gets
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gguf_model_loads_the_same_from_its_dense_copy(gguf_file, dtype, tmp_path, monkeypatch):
    reference, ref_tok = uncached(monkeypatch, str(gguf_file), dtype=dtype)
    assert copies() == []  # switched off: nothing written
    first, first_tok = ml.load_model(str(gguf_file), dtype=dtype)  # converts and keeps the copy
    name = str(dtype).removeprefix("torch.")
    version = ".".join(transformers.__version__.split(".")[:2])
    assert copies() == [f"{gc.sha256_of(gguf_file)}-{name}-transformers-{version}"]
    monkeypatch.setattr(ml, "_gguf_kwargs", lambda _: pytest.fail("the GGUF file was converted again"))
    again, tok = ml.load_model(str(gguf_file), dtype=dtype)
    for model, tokenizer in [(first, first_tok), (again, tok)]:
        assert_same_model(model, reference)
        assert_same_tokenizer(tokenizer, ref_tok, tmp_path / f"{id(model)}")
    assert again.name_or_path == str(gguf_file.parent) and again.dtype == dtype and not again.training
    ids = torch.tensor([[1, 30, 31, 4, 5]])
    out = again.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id))


def test_a_classifier_and_kept_gguf_blocks_are_the_same_from_the_dense_copy(gguf_file, monkeypatch):
    torch.manual_seed(0)
    reference, _ = uncached(monkeypatch, str(gguf_file), task="classification", labels=["x", "y"])
    torch.manual_seed(0)
    cached, _ = ml.load_model(str(gguf_file), task="classification", labels=["x", "y"])  # the new head: same seed
    assert_same_model(cached, reference)
    reference, _ = uncached(monkeypatch, str(gguf_file), quantize="gguf")
    kept, _ = ml.load_model(str(gguf_file), quantize="gguf")  # the blocks still come from the .gguf file
    assert len(quantized_weights(kept)) == 2 * 7 and {w.format for _, w in quantized_weights(kept)} == {"gguf-Q8_0"}
    assert_same_model(kept, reference)  # the blocks' scales and codes are buffers: compared too


def test_an_adapter_on_a_cached_gguf_model_records_the_gguf_files_folder(gguf_file, tmp_path):
    ml.load_model(str(gguf_file))  # keeps the copy
    model, _ = ml.load_model(str(gguf_file))  # reads it
    lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["q_proj"]))
    lorafit.save_adapter(model, tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(gguf_file.parent)


@pytest.mark.parametrize("damage", ["truncate weights", "garble weights header", "drop marker", "bad marker"])
def test_a_damaged_dense_copy_is_converted_again(gguf_file, damage, monkeypatch):
    reference, _ = uncached(monkeypatch, str(gguf_file))
    ml.load_model(str(gguf_file))
    (folder,) = (gc.cache_dir() / "converted").iterdir()
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncate weights":  # what a disk filled by someone else's write could leave
        weights.write_bytes(weights.read_bytes()[: size // 2])
    elif damage == "garble weights header":  # the same size, unreadable: only loading it finds out
        weights.write_bytes(b"\xff" * 16 + weights.read_bytes()[16:])
    elif damage == "drop marker":  # a copy never finished
        (folder / gc.MARKER).unlink()
    else:
        (folder / gc.MARKER).write_text("{not json")
    model, _ = ml.load_model(str(gguf_file))
    assert_same_model(model, reference)
    assert gc.is_complete(folder, gc.sha256_of(gguf_file)) and weights.stat().st_size == size
    assert copies() == [folder.name]  # no temp folders left beside it


def test_an_unwritable_cache_warns_and_loads_the_gguf_file(gguf_file, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="could not keep a dense copy under .*file/converted"):
        model, _ = ml.load_model(str(gguf_file))
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    assert_same_model(model, uncached(monkeypatch, str(gguf_file))[0])


def test_dense_copy_is_written_once_and_a_failed_conversion_leaves_nothing(tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF and some bytes")
    calls = []

    def convert(folder):
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"x" * 10)

    def broken(folder):
        (folder / "weights.bin").write_bytes(b"half")
        raise ValueError("conversion failed")

    with pytest.raises(ValueError, match="conversion failed"):
        gc.dense_copy(source, "float32", "5.24.1", broken)
    assert copies() == []  # neither the copy nor its temp folder
    folder = gc.dense_copy(source, "float32", "5.24.1", convert)
    assert folder == gc.cache_dir() / "converted" / f"{gc.sha256_of(source)}-float32-transformers-5.24"
    assert json.loads((folder / gc.MARKER).read_text())["files"] == {"weights.bin": 10}
    assert gc.dense_copy(source, "float32", "5.24.9", convert) == folder and len(calls) == 1  # same major.minor
    assert gc.dense_copy(source, "float32", "5.25.0", convert) != folder and len(calls) == 2  # a new conversion
    source.write_bytes(b"GGUF, changed")
    assert gc.dense_copy(source, "float32", "5.24.1", convert) != folder and len(calls) == 3
    assert len(copies()) == 3


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("No", False), ("1", True), ("", True)])
def test_the_switch(value, on, monkeypatch):
    monkeypatch.setenv(gc.SWITCH, value)
    assert gc.enabled() is on


@pytest.mark.slow
def test_real_smollm2_preset_is_the_same_from_its_dense_copy(tmp_path, monkeypatch):
    """The end-to-end proof on the real preset: weights bit for bit, config, tokenizer files and behaviour, chat
    template, and greedy generation, against transformers' own load of the .gguf file."""
    monkeypatch.setenv("LORAFIT_CACHE", str(USER_CACHE))  # the copy stays for the other slow tests
    reference, ref_tok = uncached(monkeypatch, "smollm2-135m-instruct")  # ~25 s on 2 CPU cores
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cache that cannot be written would hide what this test checks
        ml.load_model("smollm2-135m-instruct")  # converts the file (once per machine), else reads the copy
    monkeypatch.setattr(ml, "_gguf_kwargs", lambda _: pytest.fail("the GGUF file was converted again"))
    model, tok = ml.load_model("smollm2-135m-instruct")
    assert_same_model(model, reference)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert_same_tokenizer(tok, ref_tok, tmp_path)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, reference.generate(**chat, max_new_tokens=8, do_sample=False))
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:])
