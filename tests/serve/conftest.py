"""What the server's tests share: a tiny model folder made for serving, adapters on it, and a real `lorafit serve`
process on a free loopback port.

The model is conftest's tiny Llama with a longer context (its rotary positions have no fixed length), saved with a
word-level tokenizer that names all 128 ids (every generated token is a word, so texts are never empty), a
one-line chat template, and no end-of-sequence token: every completion runs to its max_tokens or a stop string,
so counts are exact and a long request stays long.
"""

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lorafit as lf
from tests.conftest import CLI_ENV, TINY_WORDS, randomize_lora, tiny_llama

CONTEXT = 512
ROLES = ["system", "user", "assistant"]
WORDS = ["<pad>", "<unk>", *TINY_WORDS, *ROLES]
WORDS += [f"w{i}" for i in range(128 - len(WORDS))]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def serving_model(path: Path) -> Path:
    """tiny_llama with a CONTEXT-token context and no EOS, and word_tokenizer(), saved as a model folder."""
    model = tiny_llama()
    model.config.max_position_embeddings = CONTEXT
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    model.config.bos_token_id = model.generation_config.bos_token_id = None
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def save_adapters(model_dir: Path, folders: dict[str, Path], seed: int = 5) -> None:
    """An adapter (random non-zero A and B) on the model at `model_dir` in each folder; ranks and targets differ."""
    shapes = [(2, ["q_proj", "v_proj"]), (6, ["q_proj", "o_proj", "down_proj"]), (4, ["k_proj", "up_proj"])]
    for i, (name, folder) in enumerate(folders.items()):
        model = tiny_llama()
        r, targets = shapes[i % len(shapes)]
        lf.inject(model, lf.LoraConfig(r=r, alpha=2 * r, targets=targets, base_model=str(model_dir)), name=name)
        randomize_lora(model, seed=seed + i)
        with torch.no_grad():  # a clear ΔW: on a random model a small one would leave greedy answers unchanged
            for _, layer in lf.lora_layers(model):
                layer.lora[name].lora_B.mul_(20)
        lf.save_adapter(model, folder, name=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `lorafit serve`: its URL, process and log file."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    def rss_kib(self) -> int:
        """Resident memory of the server process now (VmRSS, KiB)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


@contextlib.contextmanager
def serving(args: list, log: Path, env: dict | None = None, timeout: float = 90):
    """`lorafit serve ARGS --port <free>` as a subprocess, once GET /health answers; terminated at the end."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", *map(str, args), "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT,
                                   env={**_without_key(CLI_ENV), "TRANSFORMERS_OFFLINE": "1", **(env or {})})
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no answer from /health in {timeout} s:\n{log.read_text()}"
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"the server did not stop within 15 s of SIGTERM:\n{log.read_text()}") from None


def _without_key(env: dict) -> dict:
    """`env` minus LORAFIT_API_KEY: a developer's own key must not change what a test's server asks for."""
    return {k: v for k, v in env.items() if k != "LORAFIT_API_KEY"}
