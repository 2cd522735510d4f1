"""``rbees-pool status``: this host's devices, models on disk and workers."""

from __future__ import annotations

import sys
from typing import Any

import pluggy
import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import (
    FormatOption,
    OutputFormat,
    human_bytes,
    print_json,
    print_table,
)

PROGRAM = "rbees-pool"


def _workers() -> list[dict[str, Any]]:
    try:
        from rbees_core.pool.workers import list_workers
    except ImportError:  # a build without worker lifecycle: report none
        return []
    return list_workers()


def pool_state(pm: pluggy.PluginManager) -> tuple[dict[str, Any], list[str]]:
    """The pool's state in the shape of pool-managerd's ``GET /v2/state``, and the
    problems met while probing devices."""
    import socket

    import attrs

    from rbees_core.pool import inventory, memory, models
    from rbees_core.pool.load_marks import read_marks
    from rbees_core.pool.workers import held_by_records

    host = socket.gethostname()
    devices = inventory.collect(pm)
    # the figures pool-managerd reports, by the rule of the preflight (rbees_core.pool.memory)
    estimates = memory.Estimates.for_pool(pm)
    offered = inventory.Inventory(
        gpus=[estimates.offered(g, held_by_records(g.device)) for g in devices.gpus],
        cpu=None if devices.cpu is None else estimates.offered(devices.cpu,
                                                               held_by_records("cpu")),
        problems=devices.problems)
    state = {"pool_id": host, "host": host, **offered.to_dict(), "workers": _workers(),
             "models": [estimates.sized(m.to_dict()) for m in models.list_models(pm)],
             "failed_models": [attrs.asdict(m) for m in read_marks()]}
    if devices.cpu is not None:
        state["cpu"]["ram_reserved_bytes"] = offered.cpu.ram_reserved_bytes  # type: ignore[union-attr]
    return state, devices.problems


def print_text(state: dict[str, Any]) -> None:
    """``status``'s JSON as text."""
    print(f"host: {state['host']}")
    print("\ndevices:")
    rows: list[dict[str, Any]] = []
    cpu = state["cpu"]
    if cpu:
        rows.append({"device": "cpu", "name": cpu.get("name"), "memory":
                     f"{human_bytes(cpu['ram_free_bytes'])} free of "
                     f"{human_bytes(cpu['ram_total_bytes'])} RAM",
                     "load": f"{cpu['cores']} cores"})
    for gpu in state["gpus"]:
        extras = [f"{(gpu.get('utilization') or 0) * 100:.0f}% busy"]
        if gpu.get("temperature_c") is not None:
            extras.append(f"{gpu['temperature_c']} C")
        if gpu.get("power_w") is not None:
            extras.append(f"{gpu['power_w']:.0f} W")
        rows.append({"device": f"{gpu['backend']}:{gpu['index']}", "name": gpu.get("name"),
                     "memory": f"{human_bytes(gpu['memory_free_bytes'])} free of "
                               f"{human_bytes(gpu['memory_total_bytes'])}",
                     "load": ", ".join(extras)})
    if rows:
        print_table(rows, ("device", "name", "memory", "load"))
    else:
        print("none found")
    print("\nmodels:")
    if state["models"]:
        print_table([{**m, "size": human_bytes(m["size_bytes"])} for m in state["models"]],
                    ("id", "ref", "size", "source"))
    else:
        print("none (rbees-pool models download ID)")
    if state.get("failed_models"):
        print("\nmodels marked failed here (rbees models retry MODEL):")
        print_table(state["failed_models"], ("model_ref", "attempts", "reason"))
    print("\nworkers:")
    if state["workers"]:
        rows = [{**w, "cpus": ",".join(str(c) for c in w.get("cpus") or ())
                 + (" shared" if w.get("cpu_shared") else "")} for w in state["workers"]]
        print_table(rows, ("worker_id", "state", "model_ref", "backend", "device", "uri",
                           "slots_total", "threads", "cpus"))
    else:
        print("none")


def register(app: typer.Typer, pm: pluggy.PluginManager) -> None:
    @app.command("status")
    def status_command(fmt: FormatOption = OutputFormat.text) -> None:
        """Show this host's devices, the models on disk and the workers."""
        state, problems = pool_state(pm)
        for problem in problems:
            print(f"{PROGRAM}: warning: device probe {problem}", file=sys.stderr)
        if fmt is OutputFormat.json:
            print_json(state)
        else:
            print_text(state)


#: How each command's JSON reads as text (``rbees pool ... --host`` renders remote JSON).
TEXT_RENDERERS = {("status",): print_text}


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str, pm: pluggy.PluginManager) -> None:
    if program == PROGRAM:
        register(app, pm)
