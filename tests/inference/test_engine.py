"""The serving engine: continuous batching with mixed adapters gives, per request, exactly what generating that
request alone with its adapter gives; stops, sampling, cancellation, adapter eviction."""

import threading
import time

import pytest
import torch

import lorafit as lf
from lorafit.inference.adapters import AdapterStore
from lorafit.inference.engine import Engine, QueueFull
from lorafit.inference.requests import BadRequest, Request, Sampling
from tests.conftest import randomize_lora, tiny_llama


def word_tokenizer():
    """One word per id of tiny_llama's 128: "</s>" (2, its EOS) and w3 .. w127."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # the tokenizer library: only this helper needs it
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", bos_token="<s>")

PROMPTS = [[5, 9, 17, 3, 40, 41, 42], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31], [50, 51, 52, 53],
           [60, 61, 62], [70, 71, 72, 73, 74, 75]]
ADAPTERS = ["a", None, "b", "a", "b", None, "b"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapter folders on tiny_llama: a (r=2, q/v) and b (r=6, alpha 3, q/o/down)."""
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama()
    lf.inject(model, lf.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]), name="a")
    lf.inject(model, lf.LoraConfig(r=6, alpha=3, targets=["q_proj", "o_proj", "down_proj"]), name="b")
    randomize_lora(model, seed=5)
    for name in ("a", "b"):
        lf.save_adapter(model, root / name, name=name)
    return {"a": root / "a", "b": root / "b"}


class Collector:
    """A request's sink: the events, and a flag set at its end."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.finish_reason:
            self.done.set()

    @property
    def last(self):
        return self.events[-1]


def engine_for(adapters, **kwargs) -> Engine:
    engine = Engine(tiny_llama(), word_tokenizer(), **kwargs)
    for name, path in adapters.items():
        engine.call(lambda n=name, p=path: engine.adapters.register(n, p, load=False))
    return engine.start()


def run_all(engine, prompts, names, sampling):
    """Submit every prompt at once; wait for all; (requests, collectors)."""
    requests, collectors = [], []
    for prompt, name in zip(prompts, names):
        collectors.append(Collector())
        requests.append(Request(prompt, name, sampling, collectors[-1], engine.tokenizer))
        engine.submit(requests[-1])
    for c in collectors:
        assert c.done.wait(60)
    return requests, collectors


def reference(adapters, prompt, name, max_new_tokens):
    """Greedy tokens for one prompt alone, with its adapter loaded the usual way (an independent reference)."""
    model = tiny_llama()
    if name:
        lf.load_adapter(model, adapters[name], name=name)
    ids = torch.tensor([prompt])
    for _ in range(max_new_tokens):  # the whole sequence each time: no cache, no EOS
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("max_batch, prefill_chunk, max_adapters", [(3, 3, 1), (4, 12, 1), (8, 64, 2)])
@torch.no_grad()
def test_continuous_batches_match_each_request_alone(adapters, max_batch, prefill_chunk, max_adapters):
    """Fewer cache slots than requests (they join and leave), prompts prefilled together in pieces (the shorter
    ones padded), 1 adapter slot for 2 adapters (evicted and reloaded) or 2 (mixed in one batch): every
    request's tokens equal greedy decoding of it alone with its adapter loaded the usual way."""
    engine = engine_for(adapters, max_batch=max_batch, prefill_chunk=prefill_chunk, max_adapters=max_adapters)
    engine.eos = set()  # run every request to max_tokens
    try:
        requests, got = run_all(engine, PROMPTS, ADAPTERS, Sampling(max_tokens=10, temperature=0))
        assert all(c.last.finish_reason == "length" and c.last.completion_tokens == 10 for c in got)
        again, _ = run_all(engine, PROMPTS[:1], ADAPTERS[:1], Sampling(max_tokens=10, temperature=0))
        loads = engine.call(lambda: engine.adapters.loads).result(10)
        assert loads == (3 if max_adapters == 1 else 2)  # with one slot: a, b, then a again after eviction
    finally:
        engine.stop()
    expected = [reference(adapters, p, n, 10) for p, n in zip(PROMPTS, ADAPTERS)]
    assert [r.out for r in requests] == expected
    assert again[0].out == expected[0]


def test_finish_reasons_and_stop_strings(adapters):
    """EOS ends with "stop", a stop string too (cut before it), max_tokens and the context with "length"."""
    engine = engine_for(adapters, max_batch=2, max_len=16)
    try:
        greedy = Sampling(max_tokens=12, temperature=0)
        (free,), (c,) = run_all(engine, [[4, 5, 6]], [None], greedy)
        text = "".join(e.text for e in c.events)
        assert text == engine.tokenizer.decode(free.out, skip_special_tokens=True)
        words = text.split()
        assert len(set(words)) > 1, words  # the random model says something to stop in
        stop = words[1]
        _, (s,) = run_all(engine, [[4, 5, 6]], [None], Sampling(max_tokens=12, temperature=0, stop=[stop]))
        cut = "".join(e.text for e in s.events)
        assert s.last.finish_reason == "stop" and stop not in cut and text.startswith(cut)
        _, (long,) = run_all(engine, [list(range(3, 13))], [None], greedy)  # 10 prompt tokens, context 16
        assert long.last.finish_reason == "length" and long.last.completion_tokens <= 6
        engine.eos = {free.out[0]}  # the first token it would say is EOS now
        _, (eos,) = run_all(engine, [[4, 5, 6]], [None], greedy)
        assert eos.last.finish_reason == "stop" and eos.last.completion_tokens == 0
    finally:
        engine.stop()


def test_sampling_is_repeatable_with_a_seed(adapters):
    engine = engine_for(adapters, max_batch=4)
    engine.eos = set()
    try:
        hot = Sampling(max_tokens=12, temperature=1.5, seed=7)
        runs, _ = run_all(engine, [[4, 5, 6]] * 3, ["a"] * 3, hot)
        other, _ = run_all(engine, [[4, 5, 6]], ["a"], Sampling(max_tokens=12, temperature=1.5, seed=8))
        narrow, _ = run_all(engine, [[4, 5, 6]], ["a"], Sampling(max_tokens=12, temperature=1.5, top_p=1e-6))
        greedy, _ = run_all(engine, [[4, 5, 6]], ["a"], Sampling(max_tokens=12, temperature=0))
    finally:
        engine.stop()
    assert runs[0].out == runs[1].out == runs[2].out != other[0].out
    assert narrow[0].out == greedy[0].out  # a nucleus of one token is greedy


def test_cancel_frees_the_slot_and_bad_requests_are_refused(adapters):
    engine = engine_for(adapters, max_batch=1, max_queue=1, max_len=32)
    engine.eos = set()
    try:
        with pytest.raises(BadRequest, match="context is 32"):
            engine.submit(Request(list(range(40)), None, Sampling(), Collector(), engine.tokenizer))
        with pytest.raises(BadRequest, match="empty"):
            engine.submit(Request([], None, Sampling(), Collector(), engine.tokenizer))
        slow = Collector()
        first = Request([4, 5], None, Sampling(max_tokens=10_000, temperature=0), slow, engine.tokenizer)
        engine.submit(first)
        deadline = time.monotonic() + 30
        while not slow.events and time.monotonic() < deadline:  # until it runs: it has left the queue
            time.sleep(0.01)
        waiting = Request([4, 5], "a", Sampling(max_tokens=2, temperature=0), Collector(), engine.tokenizer)
        engine.submit(waiting)  # the one queue place
        with pytest.raises(QueueFull):
            for _ in range(3):
                engine.submit(Request([4], None, Sampling(), Collector(), engine.tokenizer))
        first.cancel()
        assert slow.done.wait(30) and slow.last.finish_reason in ("cancelled", "length")
        assert waiting.sink.done.wait(30) and waiting.sink.last.finish_reason == "length"
    finally:
        engine.stop()
    assert not engine.running


def test_an_unservable_adapter_is_refused_at_registration(adapters, tmp_path):
    from lorafit.inference.adapters import AdapterError

    model = tiny_llama()
    lf.inject(model, lf.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]), name="full")
    lf.save_adapter(model, tmp_path / "full", name="full")
    engine = engine_for(adapters)
    try:
        with pytest.raises(AdapterError, match="modules_to_save"):
            engine.call(lambda: engine.adapters.register("full", tmp_path / "full")).result(10)
        with pytest.raises(AdapterError, match="not found"):
            engine.call(lambda: engine.adapters.register("gone", tmp_path / "gone")).result(10)
        assert engine.call(lambda: sorted(engine.adapters.paths)).result(10) == ["a", "b"]
    finally:
        engine.stop()


def test_finished_requests_are_counted_by_reason(adapters):
    """A cancelled request ends "cancelled" at the next step, the next one takes its one slot, and every finish is
    counted by reason (what a server's metrics report)."""
    engine = engine_for(adapters, max_batch=1)
    engine.eos = set()  # only max_tokens or the cancel end a request
    try:
        gone, next_one = Collector(), Collector()
        long = Request([5, 9], "a", Sampling(max_tokens=60, temperature=0), gone, engine.tokenizer)
        engine.submit(long)
        while not long.out:
            time.sleep(0.001)
        long.cancel()
        engine.submit(Request([7, 8], None, Sampling(max_tokens=3, temperature=0), next_one, engine.tokenizer))
        assert gone.done.wait(60) and next_one.done.wait(60)
    finally:
        engine.stop()
    assert gone.last.finish_reason == "cancelled" and gone.last.completion_tokens < 60
    assert next_one.last.finish_reason == "length" and next_one.last.completion_tokens == 3
    assert engine.stats["finished:cancelled"] == 1 and engine.stats["finished:length"] == 1


def test_registering_an_adapter_at_run_time_never_evicts_one_that_running_requests_use(adapters):
    """One slot, held by a, which a running request uses: b is known at once and loads later, when asked for and a
    slot is free. Without running requests, registering b evicts a (least recently used)."""
    store = AdapterStore(tiny_llama(), max_adapters=1, dtype=torch.float32)
    store.register("a", adapters["a"])
    store.register("b", adapters["b"], busy={"a"})
    assert list(store.resident) == ["a"] and set(store.paths) == {"a", "b"}
    assert store.slot("b", busy={"a"}) is None and store.slot("b", busy=set()) == 1
    assert list(store.resident) == ["b"]


def test_request_stop_takes_no_lock(adapters):
    """A signal handler calls request_stop, and may interrupt the loop inside Event.wait while that holds the
    event's lock: request_stop must not take it (a second acquire of a plain Lock hangs forever)."""
    engine = Engine(tiny_llama(), word_tokenizer())

    def handler_inside_wait():
        with engine.wake._cond:  # as the interrupted wait holds it
            engine.request_stop()

    caller = threading.Thread(target=handler_inside_wait, daemon=True)
    caller.start()
    caller.join(5)
    assert not caller.is_alive() and engine._stop
