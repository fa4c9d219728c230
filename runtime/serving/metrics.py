"""Serving metrics in the Prometheus text format (counters, gauges, histograms), no dependency.

The engine observes; ``/metrics`` renders. Thread-safe enough for one writer (the engine
thread) and occasional readers: a scrape may see a histogram mid-update, never a torn number.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: Latency buckets (seconds) for TTFT, inter-token and end-to-end latency.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += v
        self.n += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{b}"}} {acc}')
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.total}",
                f"{self.name}_count {self.n}"]
        return out


class Metrics:
    """Everything ``/metrics`` shows. Gauges are set by the engine each iteration."""

    COUNTERS = {
        "einshard_requests_total": "requests accepted",
        "einshard_requests_rejected_total": "requests refused (queue full or invalid)",
        "einshard_requests_failed_total": "requests failed by an error in their step",
        "einshard_requests_aborted_total": "requests aborted (client disconnected or stop string)",
        "einshard_generated_tokens_total": "tokens generated",
        "einshard_prompt_tokens_total": "prompt tokens prefilled",
        "einshard_iterations_total": "engine iterations (fused decode steps)",
        "einshard_decode_rows_total": "decode-step rows computed (window size summed over steps)",
        "einshard_decode_useful_rows_total": "decode-step rows that produced a token for a live request",
        "einshard_compactions_total": "slot compactions (Flover buffer reordering)",
        "einshard_prefills_total": "admission prefill calls",
        "einshard_prefill_chunks_total": "chunked-prefill rows (Dynamic SplitFuse prompt chunks)",
        "einshard_fused_chunk_steps_total": "forwards whose one program carried decode rows and a prompt chunk",
    }
    GAUGES = {
        "einshard_queue_depth": "requests waiting for a slot",
        "einshard_active_slots": "slots holding a live request",
        "einshard_window_slots": "rows of the current decode window",
        "einshard_slots": "slots in the KV buffer",
        "einshard_kv_cache_bytes": "bytes of the slot KV buffer",
    }

    def __init__(self) -> None:
        self.counters: dict[str, float] = dict.fromkeys(self.COUNTERS, 0)
        self.gauges = dict.fromkeys(self.GAUGES, 0.0)
        self.ttft = Histogram("einshard_time_to_first_token_seconds", "arrival to first token")
        self.itl = Histogram("einshard_inter_token_latency_seconds", "time between a request's tokens")
        self.e2e = Histogram("einshard_request_latency_seconds", "arrival to last token")

    def inc(self, name: str, by: float = 1) -> None:
        self.counters[name] += by

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def render(self) -> str:
        out: list[str] = []
        for name, help in self.COUNTERS.items():
            out += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {self.counters[name]}"]
        for name, help in self.GAUGES.items():
            out += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {self.gauges[name]}"]
        for h in (self.ttft, self.itl, self.e2e):
            out += h.render()
        return "\n".join(out) + "\n"
