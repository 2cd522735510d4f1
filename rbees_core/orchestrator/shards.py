"""rbees-orcd's sharded workers (issue 27): when a job's model fits no pool alone, not even
after stopping idle workers, and pools that lend their devices over RPC (``[pool] rpc``,
their snapshot's ``rpc``) hold it together, rbees-orcd plans a shard
(:func:`rbees_core.sharding.plan_shard`), asks the lending pool for an RPC server per part
(``POST /v2/rpc/start``, the part's bytes reserved there), waits until they listen, then
asks the worker's pool for a worker sharded onto them through the lender's gateway
(``POST /v2/workers/start`` with ``rpc`` and the lender's control token). The job waits
meanwhile, as for any worker being started; its decision and ``why`` say the plan.

Called by the dispatcher (:mod:`rbees_core.orchestrator.dispatcher`) where it would end a
job with ``NO_CAPACITY``. A shard whose remote parts are on more than one lending pool is
not started yet (one token per worker).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from rbees_core.orchestrator.book import credential_for
from rbees_core.planning import host_of, need_of
from rbees_core.scheduling import Decision, Snapshot, Verdict, memory_needed, model_entry
from rbees_core.sharding import ShardPlan, plan_shard

#: the summary of the verdict a job waits for its sharded worker with
SHARDED = "no pool holds it alone: sharded over pools that lend their devices over RPC"
#: how long a lender's RPC server may take to listen
SERVER_READY_S = 30.0


def shard_for(job: dict[str, Any], pools: list[dict[str, Any]]) -> ShardPlan | None:
    """A shard for the snapshot ``job`` over the snapshot ``pools`` (pure), or None: the
    worker on a pool that holds the model file, the other parts on one lending pool."""
    model = str(job.get("model") or "")
    ready = [p for p in pools if p.get("status", "ready") == "ready"]
    holders = [p for p in ready if isinstance(model_entry(p, model), dict)]
    if not holders:
        return None
    entry = model_entry(holders[0], model)
    need = need_of(job, entry, memory_needed(job, holders[0]))
    lenders = {str(p["pool_id"]) for p in ready if p.get("rpc")}
    plan = plan_shard(need, [host_of(p) for p in ready], lenders=lenders)
    if not isinstance(plan, ShardPlan) or plan.pool_id not in {h["pool_id"] for h in holders}:
        return None
    remote = {p.pool_id for p in plan.remote}
    return plan if len(remote) == 1 and plan.pool_id not in remote else None


def shard_verdict(verdict: Verdict, plan: ShardPlan, model: str) -> Verdict:
    """The verdict a job waits for its sharded worker with: a ``start_worker`` on the
    plan's worker device whose reason is the plan, its summary :data:`SHARDED` and the
    plan (what ``why`` says)."""
    return Verdict(policy=verdict.policy, decisions=[Decision(
        "start_worker", pool_id=plan.pool_id, device=plan.device, model=model,
        reason=plan.describe())],
        candidates=verdict.candidates, summary=f"{SHARDED}: {plan.describe()}")


def with_shards(decide: Callable[[Snapshot], Verdict]) -> Callable[[Snapshot], Verdict]:
    """A policy's ``decide`` that answers a job it cannot place (``fail``, or only
    ``wait``) with a shard when lending pools hold the model together (:func:`shard_for`):
    what ``rbees scheduler simulate`` shows. (rbees-orcd itself also asks
    :func:`rbees_core.feasibility.never_placeable` first: a job that may fit later waits.)"""
    def decide_with_shards(snapshot: Snapshot) -> Verdict:
        verdict = decide(snapshot)
        job = snapshot.data.get("job") or {}
        placed = any(d.action not in ("fail", "wait") for d in verdict.decisions)
        if placed or (job.get("placement") or {}).get("pool"):
            return verdict
        plan = shard_for(job, list(snapshot.data.get("pools") or ()))
        return verdict if plan is None else shard_verdict(verdict, plan,
                                                          str(job.get("model")))

    return decide_with_shards


class Shards:
    """The shards rbees-orcd is starting (one per model at a time). ``pools``: its
    :class:`rbees_core.orchestrator.pool_control.PoolControl`."""

    def __init__(self, pools: Any) -> None:
        self.pools = pools
        self.starting: dict[str, ShardPlan] = {}
        #: (pool id, worker id) of each sharded worker it started -> (lender, server ids)
        self.active: dict[tuple[str, str], tuple[str, list[str]]] = {}

    def reap(self) -> bool:
        """Stop the RPC servers of sharded workers that are gone (failed, stopped, or no
        longer listed by their ready pool): a server serves one worker, and its memory is
        wanted for the next shard. True when it stopped some (the job waits for the
        lender's next report before planning again)."""
        registry = self.pools.registry
        gone = []
        for (pool_id, worker_id), (lender, sids) in self.active.items():
            entry = registry.pools.get(pool_id)
            worker = None if entry is None else entry.workers.get(worker_id)
            live = worker is not None and worker.get("state") not in ("failed", "stopped")
            if not live and entry is not None and registry.status(entry) == "ready":
                gone.append((pool_id, worker_id))
                for sid in sids:
                    self.pools.book.spawn(self._stop(lender, sid))
        for key in gone:
            del self.active[key]
        return bool(gone)

    async def _stop(self, pool_id: str, server_id: str) -> None:
        try:
            await self.pools.call_pool(pool_id, "POST", f"/v2/rpc/{server_id}/stop")
        except Exception as exc:  # its pool is away: it stops its servers when it drains
            self.pools.log.warning("rpc_server_stop_failed", pool_id=pool_id,
                                   server_id=server_id, error=str(exc))

    def start(self, model: str, plan: ShardPlan) -> bool:
        """Start ``plan`` for ``model`` in the background; False when one is starting."""
        if model in self.starting:
            return False
        self.starting[model] = plan
        self.pools.book.spawn(self._start(model, plan))
        return True

    async def _start(self, model: str, plan: ShardPlan) -> None:
        log = self.pools.log
        try:
            lender = plan.remote[0].pool_id
            servers = [await self._server(lender, part.device, part.bytes)
                       for part in plan.remote]
            tunnels = [tunnel for _, tunnel in servers]
            answer = await self.pools.call_pool(plan.pool_id, "POST", "/v2/workers/start", {
                "model_ref": model, "device": plan.device, "tensor_split":
                list(plan.tensor_split), "rpc": tunnels,
                "rpc_token": credential_for(self.pools.token, lender,
                                            self.pools.generations.get(lender, 0))})
            if answer.status_code >= 300:
                for sid, _ in servers:
                    await self._stop(lender, sid)
                raise RuntimeError(f"{plan.pool_id} refused the sharded worker: "
                                   f"{answer.text[:300]}")
            self.active[(plan.pool_id, answer.json()["worker_id"])] = (
                lender, [sid for sid, _ in servers])
            log.info("shard_started", model=model, plan=plan.describe())
        except Exception as exc:  # logged; the job's next round plans again
            log.error("shard_start_failed", model=model, error=str(exc))
        finally:
            self.starting.pop(model, None)

    async def _server(self, pool_id: str, device: str, memory_bytes: int) -> tuple[str, str]:
        """An RPC server on ``pool_id``'s ``device`` reserving ``memory_bytes``, ready:
        its id and tunnel URL."""
        answer = await self.pools.call_pool(pool_id, "POST", "/v2/rpc/start", {
            "device": device, "memory_bytes": memory_bytes})
        if answer.status_code >= 300:
            raise RuntimeError(f"{pool_id} refused an RPC server: {answer.text[:300]}")
        sid = answer.json()["server_id"]
        deadline = time.monotonic() + SERVER_READY_S
        while time.monotonic() < deadline:
            state = (await self.pools.call_pool(pool_id, "GET", "/v2/state")).json()
            entry: dict[str, Any] = next((s for s in state.get("rpc_servers") or ()
                                          if s.get("server_id") == sid), {})
            if entry.get("state") == "ready" and entry.get("tunnel"):
                return sid, str(entry["tunnel"])
            if entry.get("state") == "failed":
                raise RuntimeError(f"RPC server {sid} on {pool_id} failed: {entry.get('error')}")
            await asyncio.sleep(0.2)
        raise RuntimeError(f"RPC server {sid} on {pool_id} not ready in {SERVER_READY_S:.0f} s")


__all__ = ["SHARDED", "Shards", "shard_for", "shard_verdict", "with_shards"]
