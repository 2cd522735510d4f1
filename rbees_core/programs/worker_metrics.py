"""Prometheus metrics of one worker. Updated from the decode thread (thread-safe).

The histograms and the token counter carry a ``model`` label (the worker's ``--model``, the
name rbees-orcd's own histograms use), so series of workers of different models can be told
apart once scraped together; the process collectors add ``process_*`` and ``python_info``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

STATES = ("loading", "ready", "busy", "draining", "stopped", "failed")
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    """The registry of one worker serving ``model`` (made by rbees-workerd at start)."""

    def __init__(self, model: str = "") -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.jobs = Counter("rbees_worker_jobs", "Jobs finished, by outcome", ["outcome"],
                            registry=r)
        # the children of the worker's one model, bound once: the decode thread observes
        # a token at a time
        self.tokens = Counter("rbees_worker_tokens_generated", "Tokens sampled", ["model"],
                              registry=r).labels(model)
        self.ttft = Histogram("rbees_worker_ttft_seconds", "Request to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r).labels(model)
        self.tpot = Histogram("rbees_worker_time_per_token_seconds",
                              "Gap between consecutive tokens of a job", ["model"],
                              buckets=_TOKEN_BUCKETS, registry=r).labels(model)
        self.queue_wait = Histogram("rbees_worker_queue_wait_seconds",
                                    "Request to slot admission", ["model"],
                                    buckets=_TTFT_BUCKETS, registry=r).labels(model)
        self.slots_total = Gauge("rbees_worker_slots", "Slots of this worker", registry=r)
        self.slots_busy = Gauge("rbees_worker_slots_busy", "Slots holding a job", registry=r)
        self.memory = Gauge("rbees_worker_model_memory_bytes", "Model and cache memory",
                            registry=r)
        self.load_time = Gauge("rbees_worker_load_seconds", "Time the model took to load",
                               registry=r)
        self.state = Gauge("rbees_worker_state", "1 for the current state", ["state"],
                           registry=r)
        # an embedding worker's (--embedding): inputs / passes is the batching achieved
        self.embed_inputs = Counter("rbees_worker_embed_inputs", "Texts embedded",
                                    registry=r)
        self.embed_tokens = Counter("rbees_worker_embed_tokens", "Tokens of the texts embedded",
                                    registry=r)
        self.embed_passes = Counter("rbees_worker_embed_forward_passes",
                                    "Forward passes of embedding jobs", registry=r)

    def set_state(self, state: str) -> None:
        for name in STATES:
            self.state.labels(state=name).set(1 if name == state else 0)

    def loaded(self, *, slots: int, memory_bytes: int, seconds: float) -> None:
        self.slots_total.set(slots)
        self.memory.set(memory_bytes)
        self.load_time.set(seconds)

    # engine.Observer
    def job_started(self, queue_wait_s: float) -> None:
        self.queue_wait.observe(queue_wait_s)

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def token(self, gap_s: float) -> None:
        self.tpot.observe(gap_s)

    def job_finished(self, outcome: str, tokens_out: int) -> None:
        self.jobs.labels(outcome=outcome).inc()
        self.tokens.inc(tokens_out)

    def embedded(self, *, inputs: int, tokens: int, passes: int) -> None:
        """One embedding job done (rbees_core.programs.worker_embed)."""
        self.embed_inputs.inc(inputs)
        self.embed_tokens.inc(tokens)
        self.embed_passes.inc(passes)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
