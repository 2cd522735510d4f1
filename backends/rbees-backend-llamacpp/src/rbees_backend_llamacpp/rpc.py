"""llama.cpp's RPC backend (ggml-rpc): a device of this host served to a worker elsewhere,
and the remote devices a sharded worker loads part of its model onto.

Two sides of one protocol, both through ctypes on the libraries llama-cpp-python ships (it
must be built with ``-DGGML_RPC=ON``, ``scripts/setup.sh``):

- :func:`serve` runs ``ggml_backend_rpc_start_server`` for one local device. It is what
  ``python -m rbees_backend_llamacpp.rpc`` runs, the process pool-managerd supervises
  (:mod:`rbees_core.pool.rpc`). It binds loopback only: the protocol has no authentication
  at all (anyone who reaches the port can read and write the device's memory), so a worker
  on another host reaches it through a tunnel rbees authenticates (README, "Sharding").
- :func:`remote_devices` turns ``HOST:PORT`` endpoints into ``ggml_backend_dev_t`` handles
  for ``llama_model_params.devices`` (:mod:`rbees_backend_llamacpp.offload`).

The functions come from ggml's backend registry (``ggml_backend_reg_by_name("RPC")`` and
its ``get_proc_address``), the way llama.cpp's own ``rpc-server`` finds them; the registry
itself is reached through llama-cpp-python's handle on libllama (``llama_cpp.llama_cpp._lib``,
whose dependencies include libggml), an internal of the pinned version 0.3.36 that
``tests/test_rpc.py`` checks.

An RPC server serves one client at a time: each sharded worker gets servers of its own.
ggml aborts the whole process when a server it uses goes away (``GGML_ABORT``); a sharded
worker therefore dies with its shard, and its pool reports it failed (the jobs it ran get a
retriable error from rbees-orcd).
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import socket
import sys
from collections.abc import Sequence
from typing import Any

from rbees_core.errors import BackendUnavailableError, ModelLoadError

#: ggml_backend_dev_type
DEV_CPU, DEV_GPU, DEV_IGPU = 0, 1, 2
#: ggml-rpc.h of the vendored llama.cpp: the protocol a server and a worker must share
PROTO_VERSION = (7, 0, 0)

_START = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                          ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
_ADD = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)


class Ggml:
    """The few ggml registry functions rbees needs, typed once. Raises
    :class:`BackendUnavailableError` when llama-cpp-python was built without RPC."""

    ggml_backend_reg_by_name: Any
    ggml_backend_reg_get_proc_address: Any
    ggml_backend_reg_dev_count: Any
    ggml_backend_reg_dev_get: Any
    ggml_backend_dev_count: Any
    ggml_backend_dev_get: Any
    ggml_backend_dev_by_type: Any
    ggml_backend_dev_type: Any
    ggml_backend_dev_name: Any
    ggml_backend_dev_description: Any
    ggml_backend_dev_memory: Any

    def __init__(self) -> None:
        try:
            from llama_cpp import llama_cpp as binding
        except ImportError as exc:  # pragma: no cover - the dependency is declared
            raise BackendUnavailableError(f"llama-cpp-python is not importable: {exc}") from exc
        lib = binding._lib  # libllama; dlsym also searches libggml, its dependency
        binding.llama_backend_init()
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        for name, args, res in (
                ("ggml_backend_reg_by_name", [ctypes.c_char_p], vp),
                ("ggml_backend_reg_get_proc_address", [vp, ctypes.c_char_p], vp),
                ("ggml_backend_reg_dev_count", [vp], sz),
                ("ggml_backend_reg_dev_get", [vp, sz], vp),
                ("ggml_backend_dev_count", [], sz),
                ("ggml_backend_dev_get", [sz], vp),
                ("ggml_backend_dev_by_type", [ctypes.c_int], vp),
                ("ggml_backend_dev_type", [vp], ctypes.c_int),
                ("ggml_backend_dev_name", [vp], ctypes.c_char_p),
                ("ggml_backend_dev_description", [vp], ctypes.c_char_p),
                ("ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)],
                 None)):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
            setattr(self, name, fn)
        self.lib = lib
        self.reg = self.ggml_backend_reg_by_name(b"RPC")
        if not self.reg:
            raise BackendUnavailableError(
                "this llama-cpp-python was built without llama.cpp's RPC backend; rebuild it "
                "with CMAKE_ARGS=-DGGML_RPC=ON (scripts/setup.sh does)",
                details={"backend": "llamacpp"})
        self.start_server = _START(self._proc(b"ggml_backend_rpc_start_server"))
        self.add_server = _ADD(self._proc(b"ggml_backend_rpc_add_server"))

    def _proc(self, name: bytes) -> int:
        addr = self.ggml_backend_reg_get_proc_address(self.reg, name)
        if not addr:
            raise BackendUnavailableError(f"ggml's RPC backend has no {name.decode()}")
        return int(addr)

    def memory(self, dev: int) -> tuple[int, int]:
        """``(free, total)`` bytes of a device (for a remote one: one round trip)."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        return int(free.value), int(total.value)

    def local_gpus(self) -> list[int]:
        """The ``ggml_backend_dev_t`` of this host's GPUs (cuda, metal), in ggml's order;
        remote (RPC) devices, which ggml also types as GPUs, are not among them."""
        devices = (self.ggml_backend_dev_get(i) for i in range(self.ggml_backend_dev_count()))
        return [int(d) for d in devices if self.ggml_backend_dev_type(d) in (DEV_GPU, DEV_IGPU)
                and not (self.ggml_backend_dev_name(d) or b"").upper().startswith(b"RPC")]

    def local_device(self, kind: str, index: int) -> int:
        """The ``ggml_backend_dev_t`` of ``cpu`` or the ``index``-th GPU (cuda, metal)."""
        if kind == "cpu":
            dev = self.ggml_backend_dev_by_type(DEV_CPU)
            if dev:
                return int(dev)
        else:
            gpus = self.local_gpus()
            if index < len(gpus):
                return gpus[index]
        raise BackendUnavailableError(f"no ggml device {kind}:{index} here",
                                      details={"device": f"{kind}:{index}"})


_GGML: Ggml | None = None


def ggml() -> Ggml:
    """The process's one :class:`Ggml` (registry handles are process-wide)."""
    global _GGML
    if _GGML is None:
        _GGML = Ggml()
    return _GGML


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost`` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> ``(host, port)``; :class:`ModelLoadError` for
    anything else."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ModelLoadError(f"bad RPC endpoint {endpoint!r}: expected HOST:PORT",
                             details={"endpoint": endpoint})
    return host.strip("[]"), int(port)


def probe(endpoint: str, timeout: float = 3.0) -> None:
    """Connect to ``endpoint`` once and close: ggml aborts the process when a server it
    connects to is not there, so a worker checks each endpoint with this first. Raises
    :class:`ModelLoadError` (the shard cannot load) when nothing listens."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ModelLoadError(f"RPC server {endpoint} is not reachable: {exc}",
                             details={"endpoint": endpoint}) from exc


def remote_devices(endpoints: Sequence[str]) -> list[int]:
    """Every device each RPC server of ``endpoints`` serves, in order, as
    ``ggml_backend_dev_t`` handles. Raises :class:`ModelLoadError` for a server that does
    not answer, :class:`BackendUnavailableError` without RPC in this build."""
    g = ggml()
    devices: list[int] = []
    for endpoint in endpoints:
        probe(endpoint)
        reg = g.add_server(endpoint.encode())
        if not reg:
            raise ModelLoadError(f"RPC server {endpoint} serves no device",
                                 details={"endpoint": endpoint})
        devices += [int(g.ggml_backend_reg_dev_get(reg, i))
                    for i in range(g.ggml_backend_reg_dev_count(reg))]
    return devices


def serve(host: str, port: int, device: str = "cpu", threads: int = 1,
          cache_dir: str | None = None) -> None:
    """Serve ``device`` (``cpu``, ``cuda[:i]``, ``metal``) on ``host:port`` until the
    process is killed. ``host`` must be a loopback address (see the module's docstring):
    anything else raises :class:`BackendUnavailableError` before a socket opens."""
    if not is_loopback(host):
        raise BackendUnavailableError(
            f"an RPC server binds loopback only, not {host!r}: llama.cpp's RPC protocol has "
            "no authentication (reach it through a tunnel)", details={"host": host})
    kind, _, index = device.partition(":")
    g = ggml()
    dev = g.local_device(kind, int(index or 0))
    devs = (ctypes.c_void_p * 1)(dev)
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    g.start_server(endpoint.encode(), cache_dir.encode() if cache_dir else None,
                   max(1, threads), 1, devs)
    # start_server returns only when it could not listen (or accept)
    raise BackendUnavailableError(f"the RPC server could not listen on {endpoint}",
                                  details={"endpoint": endpoint})


def main(argv: list[str] | None = None) -> int:
    """``python -m rbees_backend_llamacpp.rpc --port N [--host 127.0.0.1] [--device cpu]
    [--threads N]``: what pool-managerd starts (:mod:`rbees_core.pool.rpc`)."""
    parser = argparse.ArgumentParser(prog="python -m rbees_backend_llamacpp.rpc",
                                     description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    try:
        serve(args.host, args.port, args.device, args.threads, args.cache_dir)
    except (BackendUnavailableError, ModelLoadError) as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
