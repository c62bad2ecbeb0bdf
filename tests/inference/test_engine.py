"""The serving engine: continuous batching with mixed adapters gives, per request, exactly what generating that
request alone with its adapter gives; stops, sampling, cancellation, adapter eviction."""

import threading

import pytest
import torch

import lorafit as lf
from lorafit.inference.engine import Engine, QueueFull
from lorafit.inference.requests import BadRequest, Request, Sampling
from tests.conftest import randomize_lora, tiny_llama, tiny_tokenizer

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
    engine = Engine(tiny_llama(), tiny_tokenizer(), **kwargs)
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


@torch.no_grad()
def test_continuous_batches_match_each_request_alone(adapters):
    """3 slots for 7 requests (they join and leave), prompts prefilled 3 tokens at a time, 1 adapter slot for 2
    adapters (evicted and reloaded): every request's tokens equal generate() on it alone."""
    engine = engine_for(adapters, max_batch=3, prefill_chunk=3, max_adapters=1)
    engine.eos = set()  # run every request to max_tokens
    try:
        requests, got = run_all(engine, PROMPTS, ADAPTERS, Sampling(max_tokens=10, temperature=0))
        assert all(c.last.finish_reason == "length" and c.last.completion_tokens == 10 for c in got)
        again, _ = run_all(engine, PROMPTS[:1], ADAPTERS[:1], Sampling(max_tokens=10, temperature=0))
        assert engine.call(lambda: engine.adapters.loads).result(10) == 3  # a, b, then a again after eviction
    finally:
        engine.stop()
    expected = [reference(adapters, p, n, 10) for p, n in zip(PROMPTS, ADAPTERS)]
    assert [r.out for r in requests] == expected
    assert again[0].out == expected[0]
