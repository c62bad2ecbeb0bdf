"""One generation request of the serving engine: its sampling settings, its output text as it grows (stop
strings, unfinished UTF-8), and the events it sends back."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 8  # as OpenAI's API: up to 4 there; a few more cost nothing here


class BadRequest(ValueError):
    """A request the engine refuses as it stands (HTTP 400); the message names the field."""


@dataclass
class Sampling:
    """How to pick each next token. temperature 0 is greedy; top_p < 1 keeps the smallest set of tokens whose
    probabilities add up to top_p (nucleus sampling); `seed` makes a sampled answer repeatable."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens whatever the model says (vLLM's option; for benchmarks)

    def check(self, max_tokens_limit: int) -> None:
        def bad(name: str, why: str, value) -> BadRequest:
            return BadRequest(f"{name} {why}, got {value!r}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1", self.max_tokens)
        if self.max_tokens > max_tokens_limit:
            raise bad("max_tokens", f"must be at most {max_tokens_limit} on this server", self.max_tokens)
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 2:
            raise bad("temperature", "must be a number in [0, 2]", self.temperature)
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be a number in (0, 1]", self.top_p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):  # what torch's generators take
            raise bad("seed", "must be an integer in [-2**63, 2**64)", self.seed)
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be true or false", self.ignore_eos)
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", f"must be up to {MAX_STOP_STRINGS} non-empty strings", self.stop)


@dataclass
class Event:
    """What the engine sends a request's owner: a piece of text, then once a finish reason and the usage counts.
    finish_reason: "stop" (EOS or a stop string), "length" (max_tokens or the context), "cancelled", "error"."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from one row of logits (vocab,), as `sampling` says."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # the nucleus ends where the sum passes p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """A request's output text, decoded as tokens arrive: sends only finished characters and holds back what
    might still become a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already sent
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token: (new text to send, True when a stop string ended the text)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                piece, self.sent = text[self.sent:at], at
                return piece, True
        if text.endswith("\ufffd"):  # a character cut in the middle of its bytes: wait for the rest
            return "", False
        ready = len(text) - self.hold
        if ready <= self.sent:
            return "", False
        piece, self.sent = text[self.sent:ready], ready
        return piece, False

    def rest(self) -> str:
        """The text held back, sent when the request ends for another reason than a stop string."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        piece, self.sent = text[self.sent:], len(text)
        return piece


_ids = itertools.count(1)


class Request:
    """A prompt (token ids), the adapter to run it with (None: the base model), sampling settings, and `sink`,
    called from the engine thread with each Event."""

    def __init__(self, prompt: list[int], adapter: str | None, sampling: Sampling, sink: Callable[[Event], None],
                 tokenizer):
        self.id = next(_ids)
        self.prompt, self.adapter, self.sampling, self.sink = prompt, adapter, sampling, sink
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.text = TextStream(tokenizer, sampling.stop)
        self.out: list[int] = []  # generated token ids
        self.prefilled = 0  # prompt tokens already in the cache
        self.bank_slot = 0  # where the engine found its adapter (lorafit.core.mixed)
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token: float | None = None  # when its first token was sampled

    def cancel(self) -> None:
        """Ask the engine to drop this request (a client that went away); it frees the slot at its next step."""
        self.cancelled = True

    @property
    def length(self) -> int:
        """Tokens of this sequence in the cache once its last sampled token is written."""
        return len(self.prompt) + len(self.out)
