"""Prometheus metrics of pool-managerd, built from the service's state at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge

if TYPE_CHECKING:
    from rbees_core.pool.daemon import PoolService

STATES = ("starting", "ready", "busy", "draining", "stopping", "stopped", "failed")


class PoolMetrics:
    def __init__(self, svc: PoolService) -> None:
        r = self.registry = CollectorRegistry()
        workers = Gauge("rbees_pool_workers", "Workers by state", ["state"], registry=r)
        for state in STATES:
            workers.labels(state=state).set(
                sum(1 for w in svc.workers.values() if w.state == state))
        reserved = Gauge("rbees_pool_memory_reserved_bytes", "Memory held by live workers",
                         ["device"], registry=r)
        for device in sorted({w.record.device for w in svc.workers.values()} | {"cpu"}):
            held = svc.held(device)
            reserved.labels(device=device).set(held.loaded_bytes + held.starting_bytes)
        Gauge("rbees_pool_downloads_active", "Model downloads in flight",
              registry=r).set(len(svc.downloads))
        Gauge("rbees_pool_heartbeat_seq", "Last heartbeat sequence number",
              registry=r).set(svc.seq)
