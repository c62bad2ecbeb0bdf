"""The serving engine: continuous batching of many requests, each with its own adapter, over one base model.

One thread owns the model and the process's compute threads; everything else only queues work for it
(`submit`, `call`). Each step of its loop:

    1. run the queued commands (load or unload an adapter) and drop cancelled requests;
    2. admit the next waiting request when a slot is free (its adapter loaded into a bank slot if needed);
    3. decode one token for every running request, in one forward pass, each row with its own adapter;
    4. prefill at most `prefill_chunk` prompt tokens of the request being admitted, so a long prompt delays the
       running requests by one chunk per step, never by its whole length.

A request leaves the batch at the step it ends (EOS, a stop string, max_tokens, the context limit, a client
that went away) and the next one takes its slot.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future

import torch
from torch import nn

from .adapters import AdapterStore
from .kvcache import SlotCache
from .requests import BadRequest, Event, Request, pick


class QueueFull(RuntimeError):
    """More requests are waiting than the server takes (HTTP 429)."""


class Engine:
    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 8, max_adapters: int = 8,
                 max_len: int | None = None, max_queue: int = 256, prefill_chunk: int = 128, threads: int = 1,
                 merged: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_len = min(context, max_len or context)
        self.max_batch, self.max_queue, self.prefill_chunk, self.threads = max_batch, max_queue, prefill_chunk, threads
        dtype = next(model.parameters()).dtype
        self.cache = SlotCache(model.config, max_batch, self.max_len, dtype)
        # The adapters' thin matmuls run in fp32 on a CPU: its bf16 kernels have a large fixed cost per call
        # that a rank-8 product never earns back (docs/performance.md).
        bank_dtype = torch.float32 if self.cache.keys[0].device.type == "cpu" else dtype
        self.adapters = None if merged else AdapterStore(model, max_adapters, bank_dtype)
        self.eos = _eos_ids(model, tokenizer)
        forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"  # transformers 5 / 4
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self.waiting: deque[Request] = deque()
        self.decoding: list[Request] = []  # slot i of the cache holds decoding[i]
        self.prefilling: Request | None = None  # in slot len(decoding)
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.stats = Counter()  # tokens, requests, per-adapter requests ("requests:<name>"), "finished:<reason>"
        self.recent: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens) per step, for tokens/s
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="lorafit-engine", daemon=True)

    # --- what other threads call ---

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self.wake.set()
        self.thread.join()

    def submit(self, request: Request) -> None:
        """Queue a request; BadRequest when its prompt does not fit, QueueFull when the queue is full."""
        if len(request.prompt) == 0:
            raise BadRequest("the prompt is empty")
        if len(request.prompt) >= self.max_len:
            raise BadRequest(f"the prompt is {len(request.prompt)} tokens; this model's context is {self.max_len} "
                             "tokens, prompt and completion together")
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting; try again shortly")
            self.waiting.append(request)
        self.wake.set()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the engine thread between two steps; its result (or exception) comes back in the Future."""
        future: Future = Future()
        self.commands.put((fn, future))
        self.wake.set()
        return future

    def busy_adapters(self) -> set[str]:
        """Adapters that running requests use (engine thread only)."""
        running = [*self.decoding, *([self.prefilling] if self.prefilling else [])]
        return {r.adapter for r in running if r.adapter is not None}

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-9)

    # --- the engine thread ---

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self._stop:
                self._commands()
                self._admit()
                if not self.decoding and self.prefilling is None:
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                try:
                    self._decode()
                    self._prefill()
                except Exception as err:  # a bug or out of memory: fail the running requests, keep serving
                    self._fail_running(err)

    def _commands(self) -> None:
        while not self.commands.empty():
            fn, future = self.commands.get()
            try:
                future.set_result(fn())
            except Exception as err:
                future.set_exception(err)
        if self.adapters is not None:
            self.adapters.release_unknown(self.busy_adapters())

    def _admit(self) -> None:
        """Start the first waiting request whose adapter can be had now, when a slot is free."""
        if self.prefilling is not None or len(self.decoding) >= self.max_batch:
            return
        with self.lock:
            candidates = list(self.waiting)
        for request in candidates:
            if request.cancelled:
                self._forget(request)
                self._finish(request, "cancelled")
                continue
            slot = self._adapter_slot(request)
            if slot is None:
                continue  # its adapter waits for a slot; a later request may use a loaded one
            self._forget(request)
            if slot >= 0:
                request.bank_slot = slot
                self.prefilling = request
                self.stats["requests"] += 1
                self.stats[f"requests:{request.adapter or 'base'}"] += 1
            return

    def _adapter_slot(self, request: Request) -> int | None:
        """The bank slot for the request's adapter; -1 after failing a request whose adapter cannot load."""
        if self.adapters is None:
            return 0
        if request.adapter is not None and request.adapter not in self.adapters.paths:
            self._forget(request)
            self._finish(request, "error", f"the adapter {request.adapter!r} was unloaded")
            return -1
        try:
            return self.adapters.slot(request.adapter, self.busy_adapters())
        except ValueError as err:
            self._finish(request, "error", str(err))
            return -1

    def _forget(self, request: Request) -> None:
        with self.lock:
            if request in self.waiting:
                self.waiting.remove(request)

    def _forward(self, ids: torch.Tensor, first: int, starts: list[int], slots: list[int]) -> torch.Tensor:
        """Logits (n, vocab) of the last position of each row, rows in cache slots first..first+n-1."""
        positions, mask = self.cache.prepare(first, starts, ids.shape[1])
        if self.adapters is not None:
            self.adapters.routing.rows = torch.tensor(slots)
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                         **{self._cache_arg: self.cache}, **self._last_only)
        return out.logits[:, -1]

    def _decode(self) -> None:
        self._drop_cancelled()
        if not self.decoding:
            return
        ids = torch.tensor([[r.out[-1]] for r in self.decoding])
        logits = self._forward(ids, 0, [r.length - 1 for r in self.decoding], [r.bank_slot for r in self.decoding])
        done = [i for i, r in enumerate(self.decoding) if self._emit(r, logits[i])]
        self.recent.append((time.perf_counter(), len(self.decoding)))
        for i in reversed(done):
            self._leave(i)

    def _prefill(self) -> None:
        request = self.prefilling
        if request is None:
            return
        if request.cancelled:
            self.prefilling = None
            self._finish(request, "cancelled")
            return
        chunk = request.prompt[request.prefilled:request.prefilled + self.prefill_chunk]
        logits = self._forward(torch.tensor([chunk]), len(self.decoding), [request.prefilled], [request.bank_slot])
        request.prefilled += len(chunk)
        if request.prefilled < len(request.prompt):
            return
        self.prefilling = None
        request.first_token = time.perf_counter()
        if not self._emit(request, logits[0]):
            self.decoding.append(request)  # it already sits in slot len(decoding)

    def _emit(self, request: Request, logits: torch.Tensor) -> bool:
        """Sample the request's next token and send its text; True when the request has ended."""
        token = pick(logits, request.sampling, request.generator)
        self.stats["tokens"] += 1
        if token in self.eos and not request.sampling.ignore_eos:
            self._finish(request, "stop")
            return True
        request.out.append(token)
        piece, stopped = request.text.push(token)
        if piece:
            request.sink(Event(text=piece))
        if stopped:
            self._finish(request, "stop", send_rest=False)
        elif len(request.out) >= request.sampling.max_tokens or request.length >= self.max_len:
            self._finish(request, "length")
        else:
            return False
        return True

    def _finish(self, request: Request, reason: str, error: str | None = None, send_rest: bool = True) -> None:
        rest = request.text.rest() if send_rest and reason in ("stop", "length") else ""
        self.stats[f"finished:{reason}"] += 1
        request.sink(Event(text=rest, finish_reason=reason, prompt_tokens=len(request.prompt),
                           completion_tokens=len(request.out), error=error))

    def _leave(self, i: int) -> None:
        """Remove decoding[i]; the last decoding request (and the one being prefilled) move down a slot."""
        last = len(self.decoding) - 1
        if i != last:
            self.cache.move(last, i, self.decoding[last].length)
            self.decoding[i] = self.decoding[last]
        self.decoding.pop()
        if self.prefilling is not None and self.prefilling.prefilled:
            self.cache.move(last + 1, last, self.prefilling.prefilled)

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.decoding))):
            if self.decoding[i].cancelled:
                self._finish(self.decoding[i], "cancelled")
                self._leave(i)

    def _fail_running(self, err: Exception) -> None:
        for request in [*self.decoding, *([self.prefilling] if self.prefilling else [])]:
            self._finish(request, "error", f"{type(err).__name__}: {err}")
        self.decoding, self.prefilling = [], None


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a completion: the generation config's EOS ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
