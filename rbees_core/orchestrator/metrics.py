"""Prometheus metrics of rbees-orcd. Gauges are computed at scrape time from the queue, the
pool registry and the runs of the book (:mod:`.book`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from rbees_core.orchestrator.book import Run
    from rbees_core.orchestrator.queue import JobQueue
    from rbees_core.orchestrator.registry import PoolRegistry

_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
_SCHED = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class _StateCollector(Collector):
    def __init__(self, queue: JobQueue, registry: PoolRegistry, runs: dict[str, Run]) -> None:
        self.queue, self.registry, self.runs = queue, registry, runs

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("rbees_queue_depth", "Queued jobs per lane", labels=["lane"])
        depths = self.queue.depths()
        depth.add_metric(["interactive"], depths.interactive + depths.promoted)
        depth.add_metric(["batch"], depths.batch)
        yield depth
        pools = GaugeMetricFamily("rbees_pools", "Pools by status", labels=["status"])
        workers = GaugeMetricFamily("rbees_workers", "Workers by state", labels=["state"])
        by_status: dict[str, int] = {"ready": 0, "unavailable": 0, "offline": 0}
        by_state: dict[str, int] = {}
        for entry in self.registry:
            status = self.registry.status(entry)
            by_status[status] = by_status.get(status, 0) + 1
            for w in entry.workers.values():
                by_state[str(w.get("state"))] = by_state.get(str(w.get("state")), 0) + 1
        for status, n in sorted(by_status.items()):
            pools.add_metric([status], n)
        for state, n in sorted(by_state.items()):
            workers.add_metric([state], n)
        yield pools
        yield workers
        running = GaugeMetricFamily("rbees_jobs_running", "Jobs dispatched and not finished")
        running.add_metric([], len(self.runs))
        yield running


class OrchestratorMetrics:
    """rbees-orcd's Prometheus registry: counters and histograms the service's parts feed,
    and gauges read at scrape time from ``queue``, ``registry`` and ``runs`` (job id ->
    run, the book's)."""

    def __init__(self, queue: JobQueue, registry: PoolRegistry, runs: dict[str, Run]) -> None:
        r = self.registry = CollectorRegistry()
        self.admitted = Counter("rbees_jobs_admitted", "Jobs admitted", registry=r)
        self.finished = Counter("rbees_jobs", "Jobs finished, by outcome", ["outcome"],
                                registry=r)
        self.ttft = Histogram("rbees_ttft_seconds", "Admission to first token", ["model"],
                              buckets=_TTFT, registry=r)
        self.tpot = Histogram("rbees_time_per_token_seconds", "Gap between tokens of a job",
                              ["model"], buckets=_TPOT, registry=r)
        self.scheduling = Histogram("rbees_scheduling_seconds", "Time of one policy decision",
                                    buckets=_SCHED, registry=r)
        r.register(_StateCollector(queue, registry, runs))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._gaps: list[tuple[str, float]] = []

    def first_token(self, run: Run) -> None:
        now = time.time()
        self.ttft.labels(run.model).observe(max(0.0, now - run.created_at))
        run.last_token_at = now

    def token(self, run: Run) -> None:
        """Record the gap since the job's last token; observed by :meth:`settle`."""
        now = time.time()
        self._gaps.append((run.model, now - run.last_token_at))
        run.last_token_at = now

    def settle(self) -> None:
        """Observe the gaps recorded since the last call. Called by each flush and each
        scrape: a run of observations costs less than one per token on a loop woken for
        each token, with caches the worker's decode threads keep cold (docs/benchmarks.md)."""
        gaps, self._gaps = self._gaps, []
        observers: dict[str, Any] = {}
        for model, gap in gaps:
            observe = observers.get(model)
            if observe is None:
                observe = observers[model] = self.tpot.labels(model).observe
            observe(max(0.0, gap))
