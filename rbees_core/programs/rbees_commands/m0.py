"""``rbees jobs submit`` with no daemon anywhere (M0: the CLI does the scheduling).

Used when ``--host`` is given, or when RBEES_ORCHESTRATOR_URL is unset, hosts are configured
and nothing answers at :func:`~rbees_core.programs.rbees_commands.cluster.orchestrator_url`
within :data:`HEALTH_TIMEOUT_S`:

1. every configured host (or the one ``--host NAME`` names) is asked for its state at once,
   through its pool client (:mod:`rbees_core.pool_client`), each within its own timeout; a
   host that does not answer is reported, enters the snapshot as ``offline`` and is skipped;
2. the answers become a snapshot of :mod:`rbees_core.scheduling` (pools = hosts, workers with
   their live ``slots_free``, the models on disk) and the configured scheduler plugin, the
   same one rbees-orcd runs, decides; ``-v`` prints its reasoning (:func:`explain`);
3. a ready worker with the model is reused, else one is started through the host's pool
   client (:meth:`~rbees_core.pool_client.PoolClient.worker_start`);
4. the job streams from the worker's ``POST /v2/execute`` through an SSH local port forward
   to the worker's 127.0.0.1 port (no pool port is opened to the network; the ``local``
   transport connects directly). Ctrl+C posts ``/v2/cancel`` through the same forward and
   exits 130; a worker that dies mid-stream is one error line and exit 1.

The worker stays for the next job; ``--once`` stops the worker this job started
(:meth:`~rbees_core.pool_client.PoolClient.worker_stop`); the hosts are probed and cached in
:mod:`.m0_hosts`. Nothing stops idle workers in M0 (no pool daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pluggy

from rbees_core.api.pool import WorkerStartRequest
from rbees_core.config import auth_headers, load_config
from rbees_core.errors import NoCapacityError, RbeesError
from rbees_core.placement import worker_defaults
from rbees_core.pool_client import to_json
from rbees_core.programs.rbees_commands.m0_hosts import (
    COMING,
    LIVE,
    SPAWN_TIMEOUT_S,
    WAIT_FOR_WORKER_S,
    Host,
    _say,
    gather,
    load_cache,
    load_scheduler,
    save_cache,
    use_m0,
)
from rbees_core.scheduling import Decision, Snapshot, Verdict, explain, snapshot_pool
from rbees_core.tls import client_context

__all__ = ["Host", "M0Job", "pool_entry", "submit", "use_m0"]

def pool_entry(name: str, state: dict[str, Any] | None) -> dict[str, Any]:
    """A host's ``rbees-pool status`` JSON as a snapshot pool (``offline`` without one)."""
    return snapshot_pool(state, pool_id=name)


def snapshot(job: dict[str, Any], hosts: list[Host],
             defaults: dict[str, Any] | None = None) -> Snapshot:
    """The policy's input for an M0 job: the hosts as gathered, and the ``[placement]``
    ``worker_defaults`` rbees-orcd would give (so a worker started here fills its slots
    alike)."""
    pools = [pool_entry(h.name, h.state) for h in hosts]
    data = {"now": time.time(), "job": job,
            "queue": [{k: job[k] for k in ("job_id", "model", "priority", "waited_s")}],
            "pools": pools, "throughput": {}}
    if defaults is not None:
        data["worker_defaults"] = defaults
    return Snapshot(data)


@attrs.define
class Placement:
    host: Host
    worker_id: str
    port: int
    started: bool  # this job started the worker
    #: the address the worker listens on, on its host (a worker its pool-managerd started
    #: listens on the pool's address, one started over ssh on 127.0.0.1)
    address: str = "127.0.0.1"


def _worker_address(worker: dict[str, Any]) -> str:
    """The host part of the worker's ``uri`` (127.0.0.1 when it has none or listens on
    every address)."""
    from urllib.parse import urlsplit

    host = urlsplit(str(worker.get("uri") or "")).hostname
    return "127.0.0.1" if not host or host in ("0.0.0.0", "::") else host


def _worker_port(worker: dict[str, Any]) -> int:
    if worker.get("port"):
        return int(worker["port"])
    return int(str(worker.get("uri") or "").rsplit(":", 1)[-1])


class M0Job:
    """One job from scheduling to its terminal event."""

    def __init__(self, pm: pluggy.PluginManager, hosts: list[Host], task: dict[str, Any], *,
                 placement: dict[str, Any] | None, verbose: bool, once: bool, json_out: bool,
                 started: float) -> None:
        self.pm = pm
        self.hosts = {h.name: h for h in hosts}
        self.task = task
        self.job_id = f"m0-{uuid.uuid4().hex[:16]}"
        self.job = {"job_id": self.job_id, "model": task["model"],
                    "priority": task.get("priority", "interactive"), "waited_s": 0.0,
                    "retry_count": 0, "placement": placement}
        self.verbose = verbose
        self.once = once
        self.json_out = json_out
        self.started = started
        self.timings: dict[str, float] = {}
        self.interrupted = False
        self.text: list[str] = []
        #: ``[placement]``: the slots, context and cores of a worker this job starts
        self.defaults = load_config().placement.defaults()

    def _mark(self, key: str) -> None:
        self.timings[key] = round((time.monotonic() - self.started) * 1000, 1)

    # -- placing ------------------------------------------------------------------------

    async def place(self) -> Placement:
        from rbees_core.hosts import open_transport

        for host in self.hosts.values():
            host.transport = open_transport(self.pm, host.config)
        scheduler = load_scheduler(self.pm)
        try:
            quick = await self._quick(scheduler)
            if quick is not None:
                return quick
            deadline = time.monotonic() + WAIT_FOR_WORKER_S
            while True:
                await gather(list(self.hosts.values()))
                save_cache(list(self.hosts.values()))
                self._mark("gathered_ms")
                self._report_hosts()
                snap = snapshot(self.job, list(self.hosts.values()), self.defaults)
                verdict: Verdict = scheduler.decide(snap)
                self._mark("decided_ms")
                if self.verbose:
                    _say(f"scheduler: {explain(verdict)}")
                if all(d.action == "wait" for d in verdict.decisions):
                    self._never(snap)
                placement = await self._act(verdict)
                if placement is not None:
                    return placement
                if time.monotonic() > deadline:
                    raise RbeesError(f"no worker became free for {self.task['model']} within "
                                     f"{WAIT_FOR_WORKER_S:.0f} s")
                await asyncio.sleep(1.0)
        finally:
            closer = getattr(scheduler, "close", None)
            if closer is not None:
                closer()

    def _never(self, snap: Snapshot) -> None:
        """Raise :class:`NoCapacityError` when the job can never be placed on the hosts as
        gathered (:func:`rbees_core.feasibility.never_placeable`) rather than wait for it."""
        from rbees_core import plugins
        from rbees_core.catalog import configured_catalog
        from rbees_core.feasibility import never_placeable, source_can_provide

        model = str(self.job["model"])
        found = never_placeable(self.job, snap.data["pools"], provided=source_can_provide(
            model, configured_catalog(self.pm), plugins.model_sources(self.pm)))
        if found is not None:
            raise NoCapacityError(f"the job can never run (NO_CAPACITY): {found[1]}",
                                  details={"reason": found[0]})

    async def _quick(self, scheduler: Any) -> Placement | None:
        """The quick path: each host's last answer (:func:`load_cache`) with its workers'
        live state read from the workers themselves (``/v2/ready`` through the forward, a
        few ms) instead of a fresh ``rbees-pool status`` (a program start on the host).
        Taken only when every host has a recorded answer and the policy then dispatches to
        a worker that answered; anything else goes the full way."""
        cache = load_cache()
        if not all(h.name in cache for h in self.hosts.values()):
            return None
        try:
            await asyncio.gather(*(self._refresh(h, cache[h.name]["state"])
                                   for h in self.hosts.values()))
        except Exception:  # anything odd: the full way decides
            for host in self.hosts.values():
                host.state = None
            return None
        verdict: Verdict = scheduler.decide(snapshot(self.job, list(self.hosts.values()),
                                                   self.defaults))
        self._mark("decided_ms")
        first = verdict.decisions[0] if verdict.decisions else None
        if first is None or first.action != "dispatch":
            for host in self.hosts.values():
                host.state = None
            return None
        if self.verbose:
            ages = ", ".join(f"{h.name} {time.time() - cache[h.name]['at']:.0f} s ago"
                             for h in self.hosts.values())
            _say(f"hosts as last seen ({ages}), workers' slots read live from the workers")
            _say(f"scheduler: {explain(verdict)}")
        return self._dispatch(first)

    async def _refresh(self, host: Host, state: dict[str, Any]) -> None:
        import httpx

        fresh: list[dict[str, Any]] = []
        for worker in state.get("workers") or ():
            if worker.get("state") not in LIVE | COMING:
                continue
            where = Placement(host=host, worker_id=worker["worker_id"],
                              port=_worker_port(worker),
                              address=_worker_address(worker), started=False)
            async with self._base_url(where) as base, httpx.AsyncClient(
                    base_url=base, timeout=2.0, headers=auth_headers(),
                    verify=client_context()) as client:
                try:
                    body = (await client.get("/v2/ready")).json()
                except (httpx.HTTPError, ValueError):
                    continue  # gone: not a candidate
            if body.get("model") not in (None, worker.get("model_ref")):
                continue  # another worker holds the port now
            fresh.append({**worker, "state": body.get("state", "unknown"),
                          "slots_free": body.get("slots_free")})
        host.state = {**state, "workers": fresh}

    def _report_hosts(self) -> None:
        for host in self.hosts.values():
            if host.problem:
                _say(f"host {host.name} skipped: {host.problem}")
            elif self.verbose:
                workers = len((host.state or {}).get("workers") or ())
                _say(f"host {host.name}: answered in {host.elapsed_ms:.0f} ms "
                     f"({workers} worker{'s' if workers != 1 else ''})")

    async def _act(self, verdict: Verdict) -> Placement | None:
        """The worker the verdict names (starting one if so decided); None to wait."""
        for decision in verdict.decisions:
            if decision.action == "dispatch":
                return self._dispatch(decision)
            if decision.action == "start_worker":
                return await self._start(decision)
        waits = [d for d in verdict.decisions if d.action == "wait"]
        if waits and waits[0].worker_id:  # a worker on its way: look again shortly
            return None
        reason = explain(verdict)
        if all(h.problem for h in self.hosts.values()):
            reason = "; ".join(f"{h.name}: {h.problem}" for h in self.hosts.values())
            raise RbeesError(f"no host could be reached ({reason})")
        raise RbeesError(f"cannot place the job: {reason}")

    def _dispatch(self, decision: Decision) -> Placement:
        host = self.hosts[decision.pool_id or ""]
        pool = pool_entry(host.name, host.state)
        worker = next(w for w in pool["workers"] if w["worker_id"] == decision.worker_id)
        if self.verbose:
            _say(f"reusing worker {worker['worker_id']} on {host.name}")
        return Placement(host=host, worker_id=worker["worker_id"], port=_worker_port(worker),
                         address=_worker_address(worker),
                         started=False)

    async def _start(self, decision: Decision) -> Placement:
        host = self.hosts[decision.pool_id or ""]
        kind = (decision.device or "cpu").partition(":")[0]
        device = decision.device or "cpu"
        defaults = worker_defaults({"worker_defaults": self.defaults}, device)
        request = WorkerStartRequest(
            model_ref=decision.model or self.task["model"], device=device,
            slots=decision.slots or defaults.get("slots") or 1,
            ctx=decision.ctx or defaults.get("ctx"),
            threads=decision.threads or defaults.get("threads"),
            n_gpu_layers=decision.n_gpu_layers,
            tensor_split=list(decision.tensor_split) if decision.tensor_split else None)
        _say(f"starting a {kind} worker for {self.task['model']} on {host.name}")
        record = to_json(await asyncio.wait_for(
            host.client.worker_start(request, timeout_s=SPAWN_TIMEOUT_S),
            SPAWN_TIMEOUT_S + host.config.connect_timeout_s))
        self._mark("worker_ready_ms")
        if host.state is not None and not self.once:  # the next job may find it quickly
            host.state = {**host.state, "workers": [*(host.state.get("workers") or ()),
                                                    record]}
            save_cache([host])
        if self.verbose:
            _say(f"worker {record['worker_id']} ready on {host.name} after "
                 f"{self.timings['worker_ready_ms'] - self.timings['decided_ms']:.0f} ms")
        return Placement(host=host, worker_id=record["worker_id"], port=_worker_port(record),
                         address=_worker_address(record),
                         started=True)

    # -- streaming ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _base_url(self, where: Placement) -> AsyncIterator[str]:
        transport = where.host.transport
        forward = getattr(transport, "forward_port", None)
        if where.host.config.transport == "local" or forward is None:
            address = f"[{where.address}]" if ":" in where.address else where.address
            yield f"http://{address}:{where.port}"
            return
        listener = await forward(where.port, where.address)
        try:
            yield f"http://127.0.0.1:{listener.get_port()}"
        finally:
            listener.close()

    def _body(self) -> dict[str, Any]:
        body = {k: v for k, v in self.task.items()
                if k in ("prompt", "messages", "max_tokens", "temperature", "seed", "stop",
                         "json_schema", "tools", "tool_choice", "presence_penalty",
                         "frequency_penalty", "min_p", "logprobs", "top_logprobs")}
        return {"job_id": self.job_id, **body}

    async def _stream(self, client: Any, where: Placement) -> dict[str, Any]:
        import httpx

        lost = (f"worker {where.worker_id} on {where.host.name} died mid-stream; "
                f"job {self.job_id} is lost")
        from rbees_core.sse import aiter_events

        try:
            async with client.stream("POST", "/v2/execute", json=self._body()) as answer:
                if answer.status_code >= 400:
                    await answer.aread()
                    from rbees_core.programs.rbees_commands.job_answers import check_answer

                    check_answer(answer)
                async for frame in aiter_events(answer.aiter_lines()):
                    event, data = frame.event, frame.json()
                    if event == "token":
                        if "first_token_ms" not in self.timings:
                            self._mark("first_token_ms")
                        self.text.append(data["t"])
                        if not self.json_out:
                            if data.get("reasoning"):  # rbees_core.reasoning: not the answer
                                sys.stderr.write(data["reasoning"])
                            sys.stdout.write(data["t"])
                            sys.stdout.flush()
                    elif event == "end":
                        return dict(data)
                    elif event == "error":
                        raise RbeesError(f"{data.get('code')}: {data.get('message')}")
        except httpx.TransportError as exc:
            raise RbeesError(f"{lost} ({type(exc).__name__})") from None
        raise RbeesError(f"{lost} (the stream ended before the job did)")

    async def run(self) -> int:
        import httpx

        from rbees_core.programs.rbees_commands.job_answers import print_stats

        where = await self.place()
        loop = asyncio.get_running_loop()
        try:
            async with self._base_url(where) as base, httpx.AsyncClient(
                    base_url=base, timeout=httpx.Timeout(30.0, read=None),
                    headers=auth_headers(), verify=client_context()) as client:
                task = asyncio.ensure_future(self._stream(client, where))

                def interrupt() -> None:
                    self.interrupted = True
                    task.cancel()

                loop.add_signal_handler(signal.SIGINT, interrupt)
                try:
                    end = await task
                except asyncio.CancelledError:
                    if not self.interrupted:
                        raise
                    await self._cancel(client)
                    return 130
                finally:
                    loop.remove_signal_handler(signal.SIGINT)
        finally:
            if self.once and where.started:
                await self._stop_worker(where)
            for host in self.hosts.values():
                if host.transport is not None:
                    await host.transport.aclose()
        self._mark("end_ms")
        if self.json_out:
            from rbees_core.programs.cli_common import print_json

            print_json({"job_id": self.job_id, "host": where.host.name,
                        "worker_id": where.worker_id, "worker_started": where.started,
                        "text": "".join(self.text), "end": end, "timings": self.timings})
        else:
            sys.stdout.write("\n")
            first = self.started + self.timings["first_token_ms"] / 1000 \
                if "first_token_ms" in self.timings else None
            print_stats(end, self.started, first)
        return 0

    async def _cancel(self, client: Any) -> None:
        import httpx

        try:
            await client.post("/v2/cancel", json={"job_id": self.job_id}, timeout=5.0)
            note = ""
        except httpx.HTTPError as exc:
            note = f" (the worker did not take the cancel: {type(exc).__name__})"
        if not self.json_out:
            sys.stdout.write("\n")
            sys.stdout.flush()
        print(f"cancelled {self.job_id}{note}", file=sys.stderr, flush=True)

    async def _stop_worker(self, where: Placement) -> None:
        try:
            await asyncio.wait_for(where.host.client.worker_stop(where.worker_id, grace_s=5),
                                   30.0)
            if self.verbose:
                _say(f"stopped worker {where.worker_id} on {where.host.name} (--once)")
        except (RbeesError, asyncio.TimeoutError, TimeoutError) as exc:
            _say(f"could not stop worker {where.worker_id} on {where.host.name}: "
                 f"{getattr(exc, 'message', None) or type(exc).__name__}")


def submit(task: dict[str, Any], *, host: str | None, once: bool, verbose: bool,
           json_out: bool, started: float) -> int:
    """Run one job with no daemon; returns the exit code (0, or 130 when interrupted)."""
    from rbees_core import plugins
    from rbees_core.hosts import ALL, load_hosts, select_hosts

    pm = plugins.make_manager(plugins.builtin_plugins())
    configured = load_hosts(pm=pm)
    if host and host not in ("auto", ALL):
        chosen = select_hosts(host, configured)
        placement: dict[str, Any] | None = {"pool": host}
    else:
        chosen = select_hosts(ALL, configured)
        placement = None
    if task.get("placement"):
        placement = {**(placement or {}), **task["placement"]}
    job = M0Job(pm, [Host(config=c) for c in chosen], task, placement=placement,
                verbose=verbose, once=once, json_out=json_out, started=started)
    if verbose:
        names = ", ".join(h.name for h in chosen)
        _say(f"no rbees-orcd: scheduling job {job.job_id} here over {names}")
    return asyncio.run(job.run())
