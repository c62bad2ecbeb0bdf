"""What the tests share: tiny random-weight models built from configs (fast, offline, real transformers
architectures), a saved tiny model and its tokenizer, saved tiny adapters, a tiny training job and its run config,
and the CLI runner.

Test modules import these as `from tests.conftest import ...` (tests/ is a package, so that is the module pytest
loaded); fixtures are used by name. No test module imports another.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lorafit.models import presets

REPO = Path(__file__).resolve().parents[1]  # the repository root: examples/, scripts/
USER_CACHE = presets.cache_dir()  # taken before any fixture runs: the slow tests share the real presets cache
CLI_ENV = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
TINY_WORDS = ["hello", "world", "cat", "dog"]  # the words tiny_tokenizer knows besides its special tokens


# --- tiny models ---

def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def tiny_gguf(path) -> Path:
    """A GGUF file with tiny_llama's header and no tensors at all: what needs only the config reads it."""
    import gguf  # the GGUF writer: only these tests need it

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2), w.add_context_length(64), w.add_embedding_length(64), w.add_feed_forward_length(96)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(128)
    w.add_tokenizer_model("llama"), w.add_token_list([f"t{i}" for i in range(128)])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return Path(path)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids) -> torch.Tensor:
    """The model's logits for `ids`, without gradient."""
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def peft():
    """PEFT, the reference adapter maths and files are compared against; without it only those tests skip."""
    return pytest.importorskip("peft")


def gaussian(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    """A standard-normal tensor from its own seeded generator (the global seed stays untouched)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter a non-zero B (and A), so tests see a real ΔW."""
    import lorafit

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorafit.lora_layers(model):
            for param in layer.lora.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def lm_batch(seed: int = 0) -> dict:
    """Two padded rows; the first tokens of each are a masked prompt, as in instruction tuning."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- a saved tiny model, as a Hugging Face folder ---

def byte_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE trained on `corpus` (GPT-2 / SmolLM2 style), small and fast: the real tokenizer kind."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def tiny_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *TINY_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>" if pad else None)


def saved_tiny_model(path, pad: bool = True):
    """A random-weight Llama and a word-level tokenizer saved as an ordinary Hugging Face folder."""
    tiny_llama().save_pretrained(path)
    tiny_tokenizer(pad).save_pretrained(path)
    return path


def answer(model, tok, question: str, max_new_tokens: int = 12) -> str:
    """Greedy reply through the chat template."""
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A presets cache of the test's own, and no Hugging Face hub (`pytestmark = usefixtures("private_cache")`)."""
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    # No test may touch the Hugging Face hub (the slow ones fetch presets through pip, i.e. the package index).
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: the environment alone is too late here.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- saved tiny adapters ---

def tiny_classifier_adapter(tmp_path, labels=("animal", "greeting", "other")) -> Path:
    """A LoRA classifier adapter (random non-zero B, new head) on a tiny BERT encoder saved in tmp_path/encoder,
    with its labels.json: the folder tmp_path/classifier."""
    import lorafit as lf
    from lorafit.core.anatomy import head_of
    from lorafit.models import load_model

    encoder = tmp_path / "encoder"
    tiny_bert().bert.save_pretrained(encoder)
    tiny_tokenizer().save_pretrained(encoder)
    net, _ = load_model(str(encoder), task="classification", labels=list(labels))
    lf.inject(net, lf.LoraConfig(r=2, targets=["query", "value"], task_type="SEQ_CLS", base_model=str(encoder),
                                 modules_to_save=[head_of(net)]))
    randomize_lora(net)
    lf.save_adapter(net, tmp_path / "classifier", side_files={"labels.json": list(labels)})
    return tmp_path / "classifier"


def tiny_generator_adapter(tmp_path, side_files: dict | None = None) -> Path:
    """A LoRA adapter (random non-zero B) on `saved_tiny_model(tmp_path / "model")` with `side_files`: the folder
    tmp_path/generator."""
    import lorafit as lf
    from lorafit.models import load_model

    net, _ = load_model(str(saved_tiny_model(tmp_path / "model")))
    lf.inject(net, lf.LoraConfig(r=2, targets=["q_proj", "v_proj"], base_model=str(tmp_path / "model"),
                                 task_type="CAUSAL_LM"))
    randomize_lora(net)
    lf.save_adapter(net, tmp_path / "generator", side_files=side_files)
    return tmp_path / "generator"


# --- a tiny training job ---

def tiny_job(tmp_path):
    """A saved tiny model and instruction data in `tmp_path`: (tmp_path, model folder)."""
    model = saved_tiny_model(tmp_path / "model")
    rows = [{"instruction": f"{a} {b}", "input": "", "output": b} for a in TINY_WORDS for b in TINY_WORDS] * 2
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:8]) + "\n")
    return tmp_path, model


def tiny_run_args(job_dir, model, *overrides) -> list[str]:
    """The `--section.key value` options of a 6-step fp32 run of `tiny_job(job_dir)`, then `overrides`."""
    return ["--model.name", str(model), "--data.train", str(job_dir / "train.jsonl"),
            "--data.validation", str(job_dir / "val.jsonl"), "--data.format", "instruction",
            "--lora.targets", "all-linear", "--lora.dropout", "0.1", "--train.steps", "6",
            "--train.batch_size", "4", "--train.grad_accum", "2", "--train.lr", "1e-2", "--train.warmup_steps",
            "2", "--train.save_every", "3", "--train.precision", "fp32", "--eval.max_new_tokens", "2", *overrides]


def tiny_run_config(job_dir, model, out, *overrides):
    """The RunConfig of a 6-step fp32 run of `tiny_job(job_dir)` writing to `out`; `overrides` as on the CLI."""
    from lorafit.training.config import load_run_config

    return load_run_config(None, tiny_run_args(job_dir, model, "--out", str(out), *overrides))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread while a module's tests run: runs in different processes then give the same bits (the
    fault tests' killed runs use one thread too), and a busy machine does not stall a two-thread run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_run_yaml(tmp_path) -> Path:
    """A saved tiny model, instruction data and a 3-step config writing to tmp_path/run: the config's path."""
    model = saved_tiny_model(tmp_path / "model")
    rows = [{"instruction": f"{a} {b}", "input": "", "output": b} for a in ("cat", "dog") for b in ("hello", "world")]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 3) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  name: {model}\ndata:\n  train: train.jsonl\n  val_fraction: 0.25\n"
                      f"lora:\n  targets: all-linear\ntrain:\n  steps: 3\n  batch_size: 2\nout: {tmp_path / 'run'}\n")
    return config


# --- a tiny Llama that llama.cpp runs (GGUF export) ---

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def saved_tiny_bpe_llama(path, tied: bool = True, seed: int = 0) -> Path:
    """A random-weight Llama with a byte-level BPE tokenizer (SmolLM2's kind, 320 ids) and a ChatML template, saved
    as a Hugging Face folder. Every row length is a multiple of 32 (hidden 128, 4 heads of 32, 2 KV heads, MLP 256)
    so Q8_0 / Q4_0 blocks apply, and the norms are random so a misplaced one shows."""
    corpus = ["the cat sat on the mat", "hello world, hello llama", "a dog and a cat are friends", "1, 2, 3 go"] * 4
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_bpe(corpus, 320, ["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"]),
                                  bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(gaussian(param.shape, seed=len(name)) * 0.2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


# --- the `lorafit` command ---

def run_cli(*args, cwd=None, input=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`lorafit ARGS` as a real subprocess (offline, Agg backend; `env` adds variables): its completed process."""
    return subprocess.run([sys.executable, "-m", "lorafit", *args], capture_output=True, text=True,
                          env={**CLI_ENV, **(env or {})}, cwd=cwd, input=input, timeout=timeout)
