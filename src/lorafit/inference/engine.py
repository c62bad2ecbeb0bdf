"""The serving engine: continuous batching of many requests, each with its own adapter, over one base model.

One thread owns the model and the process's compute threads; everything else only queues work for it
(`submit`, `call`). A server runs the loop on the process's main thread (`run`): in another thread, torch's
OpenMP workers of the two threads outnumber two cores, OpenMP stops spinning between its parallel regions, and
every small operation waits for a worker to wake (measured: a 16-row SmolLM2 decode step with an adapter took
119 ms on a second thread against 67 ms on the main one; docs/serving.md). `start` runs it on a thread of its own,
for tests and scripts. Each step of its loop:

    1. run the queued commands (load or unload an adapter) and drop cancelled requests;
    2. admit waiting requests while cache slots are free (each one's adapter loaded into a bank slot if needed);
    3. decode one token for every decoding request, in one forward pass, each row with its own adapter;
    4. prefill the admitted requests' prompts together, `prefill_chunk` tokens in all per step, so long prompts
       delay the decoding requests by one chunk per step, never by their whole length.

The cache slots hold `running`: its first `decoding` requests decode, the rest are being prefilled.

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
                 max_len: int | None = None, max_queue: int = 256, prefill_chunk: int = 256, threads: int = 1,
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
        self._keep = "logits_to_keep" in forward  # the model computes logits only where they are needed
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # cache slot i holds running[i]
        self.decoding = 0  # running[:decoding] decode; running[decoding:] are being prefilled
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.stats = Counter()  # tokens, requests, per-adapter requests ("requests:<name>"), "finished:<reason>"
        self.recent: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens) per step, for tokens/s
        self._stop = False
        self.thread: threading.Thread | None = None
        self.looping = False  # the loop runs: only `submit` and `call` may reach the model now

    # --- what other threads call ---

    def start(self) -> Engine:
        """Run the loop on a new thread (see the module docstring for why a server uses `run` instead)."""
        self.thread = threading.Thread(target=self.run, name="lorafit-engine", daemon=True)
        self.looping = True  # from now on, as far as other threads are concerned
        self.thread.start()
        return self

    def request_stop(self) -> None:
        """Make the loop return within half a second. Safe in a signal handler: it takes no lock (waking the loop
        would take the lock of the wait the handler may have interrupted, and hang), the idle loop polls."""
        self._stop = True

    def stop(self) -> None:
        self._stop = True
        self.wake.set()
        if self.thread is not None:
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
        return {r.adapter for r in self.running if r.adapter is not None}

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-9)

    # --- the engine thread ---

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """The engine loop, on the calling thread, until `stop`/`request_stop` or until() is true."""
        torch.set_num_threads(self.threads)
        self.looping = True
        try:
            with torch.inference_mode():
                while not self._stop and not until():
                    self._commands()
                    self._admit()
                    if not self.running:
                        self.wake.wait(0.5)
                        self.wake.clear()
                        continue
                    try:
                        self._decode()
                        self._prefill()
                    except Exception as err:  # a bug or out of memory: fail the running requests, keep serving
                        self._fail_running(err)
        finally:
            self.looping = False

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
        """Start waiting requests, in order, while cache slots are free; one whose adapter has no bank slot yet
        waits, and later requests may pass it."""
        with self.lock:
            candidates = list(self.waiting)
        for request in candidates:
            if len(self.running) >= self.max_batch:
                return
            if request.cancelled:
                self._forget(request)
                self._finish(request, "cancelled")
                continue
            slot = self._adapter_slot(request)
            if slot is None:
                continue  # its adapter waits for a bank slot; a later request may use a loaded one
            self._forget(request)
            if slot >= 0:
                request.bank_slot = slot
                self.running.append(request)
                self.stats["requests"] += 1
                self.stats[f"requests:{request.adapter or 'base'}"] += 1

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

    def _forward(self, ids: torch.Tensor, first: int, starts: list[int], last: list[int]) -> torch.Tensor:
        """Logits (n, vocab) at column last[i] of each row i; the rows are running[first:first+n]."""
        rows = self.running[first:first + len(starts)]
        positions, mask = self.cache.prepare(first, starts, ids.shape[1])
        if self.adapters is not None:
            self.adapters.routing.rows = torch.tensor([r.bank_slot for r in rows])
        columns = sorted(set(last))
        keep = {"logits_to_keep": torch.tensor(columns)} if self._keep else {}
        logits = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                            **{self._cache_arg: self.cache}, **keep).logits
        picked = [columns.index(c) if self._keep else c for c in last]
        return logits[torch.arange(len(last)), torch.tensor(picked)]

    def _decode(self) -> None:
        self._drop_cancelled()
        if not self.decoding:
            return
        rows = self.running[:self.decoding]
        ids = torch.tensor([[r.out[-1]] for r in rows])
        logits = self._forward(ids, 0, [r.length - 1 for r in rows], [0] * len(rows))
        done = [i for i, r in enumerate(rows) if self._emit(r, logits[i])]
        self.recent.append((time.perf_counter(), len(rows)))
        for i in reversed(done):
            self._leave(i)

    def _prefill(self) -> None:
        """Feed the next piece of every admitted prompt, all in one forward pass (shorter pieces padded: the
        padding lands past each row's end, where nothing looks and the row's next tokens overwrite it)."""
        rows = self.running[self.decoding:]
        if not rows:
            return
        width = max(1, min(self.prefill_chunk // len(rows), max(len(r.prompt) - r.prefilled for r in rows)))
        pieces = [r.prompt[r.prefilled:r.prefilled + width] for r in rows]
        ids = torch.tensor([p + [p[-1]] * (width - len(p)) for p in pieces])
        logits = self._forward(ids, self.decoding, [r.prefilled for r in rows], [len(p) - 1 for p in pieces])
        for request, piece, row_logits in zip(rows, pieces, logits):
            request.prefilled += len(piece)
            if request.prefilled < len(request.prompt):
                continue
            request.first_token = time.perf_counter()
            i = self.running.index(request)
            self._swap(i, self.decoding)  # it joins the decoding requests
            self.decoding += 1
            if self._emit(request, row_logits):
                self._leave(self.decoding - 1)

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

    def _cached(self, i: int) -> int:
        """Positions of cache slot i that hold running[i]'s tokens."""
        r = self.running[i]
        return r.length - 1 if i < self.decoding else r.prefilled

    def _swap(self, i: int, j: int) -> None:
        """Exchange running[i] and running[j], cache slots included."""
        if i != j:
            self.cache.swap(i, j, max(self._cached(i), self._cached(j)))
            self.running[i], self.running[j] = self.running[j], self.running[i]

    def _leave(self, i: int) -> None:
        """Remove running[i]; the last request of its group takes its slot, and the last of the prefilling
        requests the slot the decoding group gives up."""
        if i < self.decoding:
            self._swap(i, self.decoding - 1)
            self.decoding -= 1
            i = self.decoding
        self._swap(i, len(self.running) - 1)
        self.running.pop()

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.running))):
            if self.running[i].cancelled:
                self._finish(self.running[i], "cancelled")
                self._leave(i)

    def _fail_running(self, err: Exception) -> None:
        for request in self.running:
            self._finish(request, "error", f"{type(err).__name__}: {err}")
        self.running, self.decoding = [], 0


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a completion: the generation config's EOS ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
