"""`lorafit export gguf`, run as a real subprocess: merged model and GGUF LoRA adapter, and its one-line errors."""

import pytest

import lorafit
from lorafit.models import load_model
from tests.conftest import randomize_lora, run_cli, saved_tiny_bpe_llama, tiny_gpt2, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("private_cache")


def tiny_adapter(tmp_path, **lora) -> tuple:
    """(model folder, adapter folder) of a tiny byte-BPE Llama and a LoRA adapter on it with non-zero B."""
    folder = saved_tiny_bpe_llama(tmp_path / "model")
    net, _ = load_model(str(folder))
    lorafit.inject(net, lorafit.LoraConfig(base_model=str(folder), **{"r": 4, "targets": "all-linear", **lora}))
    randomize_lora(net)
    lorafit.save_adapter(net, tmp_path / "adapter")
    return folder, tmp_path / "adapter"


def test_export_gguf_writes_a_merged_model_and_a_lora_adapter(tmp_path):
    from gguf import GGUFReader

    _, adapter = tiny_adapter(tmp_path)
    done = run_cli("export", "gguf", "--adapter", str(adapter), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0")
    assert done.returncode == 0, done.stderr
    assert "GGUF model written to" in done.stderr and "with the adapter merged" in done.stderr
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    done = run_cli("export", "gguf", "--adapter", str(adapter), "--lora-only", "--out", str(tmp_path / "a.gguf"))
    assert done.returncode == 0 and "GGUF LoRA adapter written to" in done.stderr, done.stderr
    fields = {k: f.contents() for k, f in GGUFReader(str(tmp_path / "a.gguf")).fields.items()}
    assert (fields["general.type"], fields["adapter.type"], fields["adapter.lora.alpha"]) == ("adapter", "lora", 16)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1, verbose=False)
    assert llm.n_vocab() == 320
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), lora_path=str(tmp_path / "a.gguf"), n_ctx=64, n_threads=1,
                          verbose=False)  # the adapter loads onto a q8_0 base too
    assert llm.n_vocab() == 320


def test_export_gguf_mistakes_are_one_clear_line(tmp_path):
    folder, adapter = tiny_adapter(tmp_path, modules_to_save=["lm_head"])
    gpt2 = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    for args, message in (
        (["--model", str(folder), "--type", "q5_k"], "error: unknown GGUF type 'q5_k'; use one of f32, f16"),
        (["--adapter", str(adapter), "--lora-only"], "modules_to_save=['lm_head'] trains whole modules"),
        (["--model", str(gpt2)], "supports Llama-family models (LlamaForCausalLM, e.g. SmolLM2); this model is "
                                 "GPT2LMHeadModel"),
        (["--lora-only", "--model", str(folder)], "error: --lora-only needs --adapter"),
    ):
        done = run_cli("export", "gguf", *args, "--out", str(tmp_path / "out.gguf"))
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.gguf").exists()
