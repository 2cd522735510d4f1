"""rbees plugin: NVIDIA GPUs through NVML (``nvidia-ml-py``, imported as ``pynvml``).

``pynvml`` is imported inside :meth:`NvmlInventory.collect`, never at import time. No
``pynvml`` module, no NVML library or no driver: no devices, never an error.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar

from rbees_core.hookspecs import hookimpl
from rbees_core.interfaces import GpuInventory

if TYPE_CHECKING:
    from rbees_core.api.pool import GpuEntry


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _optional(nvml: Any, call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except nvml.NVMLError:  # NotSupported on some boards, NoPermission in containers
        return None


def device_entry(nvml: Any, index: int) -> GpuEntry:
    """The CONTRACT section 4 entry of GPU ``index`` (NVML numbering, PCI bus order)."""
    from rbees_core.api.pool import GpuEntry

    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    rates = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    temperature = _optional(nvml, nvml.nvmlDeviceGetTemperature, handle,
                            nvml.NVML_TEMPERATURE_GPU)
    milliwatts = _optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
    return GpuEntry(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        backend="cuda",
        memory_total_bytes=int(memory.total),
        memory_free_bytes=int(memory.free),
        memory_reserved_bytes=0,
        # MIG instances report no utilization: 0 rather than a guess
        utilization=rates.gpu / 100.0 if rates is not None else 0.0,
        temperature_c=int(temperature) if temperature is not None else None,
        power_w=round(milliwatts / 1000.0, 1) if milliwatts is not None else None,
    )


class NvmlInventory(GpuInventory):
    name: ClassVar[str] = "nvml"

    def collect(self) -> list[GpuEntry]:
        import logging  # not at import time: every command line loads this plugin

        log = logging.getLogger(__name__)
        try:
            import pynvml
        except ImportError:
            return []
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:  # LibraryNotFound, DriverNotLoaded, ...
            log.debug("NVML unavailable: %s", exc)
            return []
        try:
            entries: list[GpuEntry] = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                try:
                    entries.append(device_entry(pynvml, index))
                except pynvml.NVMLError as exc:  # a lost GPU must not hide the others
                    log.warning("NVML: GPU %d skipped: %s", index, exc)
            return entries
        except pynvml.NVMLError as exc:
            log.warning("NVML: cannot list GPUs: %s", exc)
            return []
        finally:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()


@hookimpl
def rbees_register_gpu_inventories() -> list[type[GpuInventory]]:
    return [NvmlInventory]
