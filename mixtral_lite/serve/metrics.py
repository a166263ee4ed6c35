"""The server's Prometheus metrics (prometheus-client), one registry per app.

Request and token counters are updated as requests finish; the expert-cache figures are read
from the offload engine's counters whenever /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..generation.session import Generation

P = "mixtral_lite_"


class ExpertCollector:
    """Offload engine counters as metrics (nothing when every expert is resident)."""

    def __init__(self, stats: Callable[[], dict | None]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        if not s or "hit_rate" not in s:
            return
        yield GaugeMetricFamily(P + "expert_hit_rate", "expert uses served from a slot with no transfer this token "
                                "/ expert uses", value=s["hit_rate"] or 0.0)
        recall = s.get("prefetch_recall")
        yield GaugeMetricFamily(P + "prefetch_recall", "prefetched experts later used / used experts",
                                value=recall or 0.0)
        yield CounterMetricFamily(P + "bytes_host_to_device", "expert bytes copied host -> device",
                                  value=s["bytes_host_to_device"])
        yield CounterMetricFamily(P + "expert_hits", "expert cache hits", value=s["expert_hits"])
        yield CounterMetricFamily(P + "expert_misses", "expert cache misses", value=s["expert_misses"])
        yield CounterMetricFamily(P + "prefetch_issued", "experts loaded by a prefetch",
                                  value=s.get("prefetch_issued", 0))
        yield CounterMetricFamily(P + "prefetch_used", "prefetched experts used at the step they were guessed for "
                                  "(not counted as hits)", value=s.get("prefetch_used", 0))
        yield CounterMetricFamily(P + "prefetch_wasted", "prefetched experts not used at that step",
                                  value=s.get("prefetch_wasted", 0))
        bus = CounterMetricFamily(P + "expert_bus_bytes", "expert bytes host -> device by whom they were for",
                                  labels=["kind"])
        for kind in ("demand_miss", "prefetch_used", "prefetch_wasted", "read_in_place", "admitted"):
            if f"{kind}_bytes" in s:
                bus.add_metric([kind], s[f"{kind}_bytes"])
        yield bus


class Metrics:
    def __init__(self, queue_length: Callable[[], int], running: Callable[[], int],
                 expert_stats: Callable[[], dict | None]):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(P + "requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter(P + "completion_tokens", "generated tokens", registry=r)
        self.prefill_saved = Counter(P + "prefill_tokens_saved", "prompt tokens reused from the KV cache",
                                     registry=r)
        self.cancelled = Counter(P + "requests_cancelled", "requests whose client left before the end", registry=r)
        self.failed = Counter(P + "requests_failed", "requests whose generation failed (answered with an error)",
                              registry=r)
        self.decode_tps = Gauge(P + "decode_tokens_per_second", "tokens/s of the last batch, all rows", registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "request start to first token", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        Gauge(P + "queue_length", "requests waiting", registry=r).set_function(queue_length)
        Gauge(P + "requests_running", "requests in the running batch", registry=r).set_function(running)
        r.register(ExpertCollector(expert_stats))

    def finished(self, gens: list[Generation], seconds: float) -> None:
        """Count a finished batch (called by the worker thread)."""
        for g in gens:
            self.prompt_tokens.inc(len(g.ids))
            self.completion_tokens.inc(len(g.tokens))
            self.prefill_saved.inc(g.cached_tokens)
            self.cancelled.inc(g.finish_reason == "cancelled")
            self.failed.inc(g.finish_reason == "error")
            if g.t_first is not None:
                self.ttft.observe(g.t_first - g.t_start)
        firsts = [g.t_first for g in gens if g.t_first is not None]
        decoded = sum(max(len(g.tokens) - 1, 0) for g in gens)
        span = max((g.t_end or 0.0) for g in gens) - min(firsts) if firsts else 0.0
        if decoded and span > 0:
            self.decode_tps.set(decoded / span)
