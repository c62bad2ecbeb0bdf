"""GET /metrics: the engine's state in Prometheus' text format, read at scrape time.

A collector reads the engine when Prometheus asks, rather than the server updating gauges on every step: the
engine thread stays free of metric calls, and a scrape sees the queue and the batch as they are now. Reading
from the event loop's thread is safe for these numbers: lengths, and copies of a Counter and a deque taken in
one C call each (the GIL is held throughout).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..inference.engine import Engine


class EngineCollector:
    """The gauges and counters of one engine; `base` names the base model in the per-model request counts."""

    def __init__(self, engine: Engine, base: str, rejected: dict[str, int]):
        self.engine, self.base, self.rejected = engine, base, rejected

    def collect(self):
        engine = self.engine
        stats = dict(engine.stats)
        running = len(engine.running)
        resident = len(engine.adapters.resident) if engine.adapters is not None else 0
        yield GaugeMetricFamily("lorafit_requests_waiting", "Requests queued for a batch slot",
                                value=len(engine.waiting))
        yield GaugeMetricFamily("lorafit_requests_running", "Requests in the running batch (decoding or prefilling)",
                                value=running)
        yield GaugeMetricFamily("lorafit_batch_slots", "Requests the running batch holds at most (--max-batch)",
                                value=engine.max_batch)
        yield GaugeMetricFamily("lorafit_tokens_per_second", "Tokens generated per second over the last 10 s",
                                value=engine.tokens_per_second())
        yield CounterMetricFamily("lorafit_generated_tokens", "Tokens generated since start",
                                  value=stats.get("tokens", 0))
        per_model = CounterMetricFamily("lorafit_requests", "Requests started since start, by model (base or "
                                        "adapter)", labels=["model"])
        finished = CounterMetricFamily("lorafit_requests_finished", "Requests ended since start, by reason (stop, "
                                       "length, cancelled: the client went away, error)", labels=["reason"])
        for key, n in sorted(stats.items()):
            kind, _, label = key.partition(":")
            if kind == "requests" and label:
                per_model.add_metric([self.base if label == "base" else label], n)
            elif kind == "finished":
                finished.add_metric([label], n)
        yield per_model
        yield finished
        yield self._rejected()
        yield GaugeMetricFamily("lorafit_adapters_resident", "Adapters held in memory (at most --max-adapters)",
                                value=resident)
        yield GaugeMetricFamily("lorafit_threads", "Compute threads of the engine (--threads)", value=engine.threads)
        yield GaugeMetricFamily("lorafit_max_model_len", "Context length in tokens, prompt and completion together",
                                value=engine.max_len)


    def _rejected(self) -> CounterMetricFamily:
        rejected = CounterMetricFamily("lorafit_requests_rejected", "Requests refused before they were queued, by "
                                       "reason (queue_full: answered 429)", labels=["reason"])
        for reason, n in self.rejected.items():
            rejected.add_metric([reason], n)
        return rejected


def registry_for(engine: Engine, base: str, rejected: dict[str, int]) -> CollectorRegistry:
    """A registry of this server's own (not prometheus_client's process-wide one: no state shared between apps)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, base, rejected))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
