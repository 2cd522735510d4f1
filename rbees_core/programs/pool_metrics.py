"""Prometheus metrics of pool-managerd, built from the service's state at scrape time.

Beside the pool's own gauges, each device the inventory probes report (:mod:`rbees_core.pool.
inventory`: ``nvml``, ``metal``, ``cpu``) becomes a set of gauges labelled ``pool`` and
``device`` (``cuda:0``): utilization, memory used and total, temperature and power where the
probe reads them (a board that does not report one has no sample of it). The host's RAM and
cores come from the ``cpu`` probe. The families are declared with no samples on a host
without GPUs, so a dashboard's queries name metrics every pool exports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, PlatformCollector, ProcessCollector

if TYPE_CHECKING:
    from rbees_core.pool.daemon import PoolService
    from rbees_core.pool.inventory import Inventory

STATES = ("starting", "ready", "busy", "draining", "stopping", "stopped", "failed")
#: the labels of every ``rbees_gpu_*`` gauge
GPU_LABELS = ("pool", "device", "name")


def device_gauges(registry: CollectorRegistry, pool_id: str, inv: Inventory) -> None:
    """Add the gauges of ``inv``'s devices to ``registry``: ``rbees_gpu_*`` per GPU and
    ``rbees_host_*`` for the CPU entry. Called by :class:`PoolMetrics` at each scrape."""
    r = registry
    utilization = Gauge("rbees_gpu_utilization_ratio",
                        "Share of the last sample period the GPU was busy (0..1)",
                        GPU_LABELS, registry=r)
    used = Gauge("rbees_gpu_memory_used_bytes", "GPU memory in use (all processes)",
                 GPU_LABELS, registry=r)
    total = Gauge("rbees_gpu_memory_total_bytes", "GPU memory", GPU_LABELS, registry=r)
    temperature = Gauge("rbees_gpu_temperature_celsius", "GPU core temperature",
                        GPU_LABELS, registry=r)
    power = Gauge("rbees_gpu_power_watts", "GPU power draw", GPU_LABELS, registry=r)
    for gpu in inv.gpus:
        labels = (pool_id, gpu.device, gpu.name)
        utilization.labels(*labels).set(gpu.utilization)
        used.labels(*labels).set(max(0, gpu.memory_total_bytes - gpu.memory_free_bytes))
        total.labels(*labels).set(gpu.memory_total_bytes)
        if gpu.temperature_c is not None:
            temperature.labels(*labels).set(gpu.temperature_c)
        if gpu.power_w is not None:
            power.labels(*labels).set(gpu.power_w)
    ram_used = Gauge("rbees_host_memory_used_bytes", "Host RAM in use (total - available)",
                     ["pool"], registry=r)
    ram_total = Gauge("rbees_host_memory_total_bytes", "Host RAM", ["pool"], registry=r)
    cores = Gauge("rbees_host_cores", "CPU cores of the host", ["pool"], registry=r)
    if inv.cpu is not None:
        ram_used.labels(pool_id).set(max(0, inv.cpu.ram_total_bytes - inv.cpu.ram_free_bytes))
        ram_total.labels(pool_id).set(inv.cpu.ram_total_bytes)
        cores.labels(pool_id).set(inv.cpu.cores)


class PoolMetrics:
    """The registry of one scrape of pool-managerd's ``GET /metrics``: the pool's workers,
    reservations and downloads, its devices (``inv``, read by the caller from the
    inventory probes) and the process collectors."""

    def __init__(self, svc: PoolService, inv: Inventory | None = None) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
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
        if inv is not None:
            device_gauges(r, svc.settings.pool_id, inv)
