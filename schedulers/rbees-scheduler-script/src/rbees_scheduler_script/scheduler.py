""":class:`ScriptScheduler`: a placement policy written in Starlark, run in a sandbox.

A script defines ``schedule(ctx)`` and returns a decision dict, a list of them, or None to
leave the job to the default policy. What ``ctx`` offers is listed in the package README.
The script runs in a separate process (:mod:`.sandbox`) with a time budget (50 ms) and a
memory cap. When it runs late, runs out of memory, raises, or returns something that is not
a decision the snapshot allows, the default policy (``least-loaded``) decides instead: the
verdict's ``fallback`` says why, the error is logged, and
``rbees_scheduler_script_failures_total{reason}`` counts it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from rbees_scheduler_builtin import Analysis, BuiltinPolicy, LeastLoaded
from rbees_scheduler_builtin.policies import AVOIDED

from rbees_core.errors import ConfigError
from rbees_core.interfaces import Scheduler
from rbees_core.placement import worker_defaults
from rbees_core.scheduling import (
    Candidate,
    Decision,
    Snapshot,
    Verdict,
    describe_decision,
    model_entry,
    same_model,
)
from rbees_scheduler_script.sandbox import Sandbox, SandboxError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from rbees_core.config import SchedulerConfig

log = logging.getLogger("rbees.scheduler.script")

#: Labels of ``rbees_scheduler_script_failures_total``.
FAILURE_REASONS = ("timeout", "memory", "error", "garbage", "invalid", "crash", "unavailable")
MAX_DECISIONS = 16
MAX_SCRIPT_BYTES = 256 * 1024
_KEYS = frozenset({"action", "pool_id", "worker_id", "device", "model", "reason", "code"})
_WHAT = {
    "timeout": "ran past its {budget:g} ms budget",
    "memory": "ran out of its memory budget",
    "error": "raised an error",
    "garbage": "returned something that is not a decision",
    "invalid": "returned a decision that cannot be carried out",
    "crash": "crashed",
    "unavailable": "could not run",
}


class ScriptError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def check_syntax(source: str, filename: str) -> None:
    """Parse ``source`` as the sandbox will; raises :class:`ConfigError` on a syntax error."""
    import starlark as sl

    dialect = sl.Dialect.extended()
    dialect.enable_load = False
    try:
        sl.parse(filename, source, dialect)
    except sl.StarlarkError as exc:
        from rbees_scheduler_script._child import short_error

        raise ConfigError(f"{filename}: {short_error(exc)}") from exc


class ScriptScheduler(Scheduler):
    """Runs ``schedule(ctx)`` of a Starlark script for each decision.

    Arguments: ``source`` the script, ``filename`` its name in messages, ``budget_ms`` the
    time one decision may take (the call returns within about that, plus a few ms for the
    fallback), ``memory_bytes`` the sandbox's memory cap, ``processes`` how many sandbox
    processes to keep, ``registry`` the prometheus registry of the failure counter (a
    private one by default, at :attr:`registry`), ``default`` the policy that decides when
    the script does not (least-loaded). Starts the sandbox and waits up to
    ``start_timeout_s`` for the script to load; raises :class:`ConfigError` when it does not.
    Call :meth:`close` (or use it as a context manager) to stop the sandbox processes.
    """

    name: ClassVar[str] = "script"
    description: ClassVar[str] = "a Starlark policy script ([scheduler] script = PATH)"

    def __init__(self, source: str, *, filename: str = "<script>", budget_ms: float = 50.0,
                 memory_bytes: int = 256 << 20, processes: int = 2,
                 registry: CollectorRegistry | None = None,
                 default: BuiltinPolicy | None = None,
                 start_timeout_s: float = 10.0) -> None:
        if len(source.encode()) > MAX_SCRIPT_BYTES:
            raise ConfigError(f"{filename}: a policy script may have at most "
                              f"{MAX_SCRIPT_BYTES} bytes")
        from prometheus_client import CollectorRegistry, Counter

        check_syntax(source, filename)
        self.filename = filename
        self.budget_ms = budget_ms
        self.default = default if default is not None else LeastLoaded()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.failures = Counter(
            "rbees_scheduler_script_failures",
            "Decisions a script policy failed to make (the default policy made them)",
            ["reason"], registry=self.registry)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason=reason)
        # the queue can be long: it is sent once the script has asked for it (ctx.queue())
        self._send_queue = False
        self._sandbox = Sandbox(source, filename, processes=processes, memory_bytes=memory_bytes)
        try:
            self._sandbox.wait_ready(start_timeout_s)
        except SandboxError as exc:
            self._sandbox.close()
            raise ConfigError(f"{filename}: {exc.message}") from exc

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> ScriptScheduler:
        """The scheduler of the script at ``path``; :class:`ConfigError` when it cannot be
        read or loaded."""
        p = Path(path).expanduser()
        try:
            source = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read the policy script: {exc}") from exc
        return cls(source, filename=p.name, **kwargs)

    @classmethod
    def from_config(cls, config: SchedulerConfig, **kwargs: Any) -> ScriptScheduler:
        if not config.script:
            raise ConfigError('scheduler.script: policy "script" needs a script path')
        kwargs.setdefault("budget_ms", config.budget_ms)
        kwargs.setdefault("memory_bytes", config.memory_mb << 20)
        return cls.from_path(config.script, **kwargs)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until every sandbox process has loaded the script (after a failure, its
        replacement takes about 50 ms). Raises :class:`ConfigError` if one cannot."""
        try:
            self._sandbox.wait_ready(timeout)
        except SandboxError as exc:
            raise ConfigError(f"{self.filename}: {exc.message}") from exc

    def close(self) -> None:
        self._sandbox.close()

    def metrics(self) -> CollectorRegistry:
        """The registry of the failure counter, shown on rbees-orcd's ``/metrics``."""
        return self.registry

    def __enter__(self) -> ScriptScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- deciding ---------------------------------------------------------------------------

    def decide(self, snapshot: Snapshot) -> Verdict:
        started = time.perf_counter()
        deadline = time.monotonic() + self.budget_ms / 1000
        data = snapshot.data
        a = Analysis(data)
        tier = a.tier()
        request = self._request(a, tier)
        try:
            try:
                result = self._sandbox.call(request, deadline)
            except SandboxError as exc:
                if exc.reason != "need-queue":
                    raise
                self._send_queue = True  # from now on: this script reads the queue
                request["queue"] = data.get("queue") or []
                result = self._sandbox.call(request, deadline)
            decisions = self._check(result, a, tier)
        except (SandboxError, ScriptError) as exc:
            return self._fallback(a, exc.reason, exc.message, started)
        except Exception as exc:  # the sandbox machinery itself (a process that cannot start)
            log.exception("the script scheduler's sandbox failed")
            return self._fallback(a, "crash", f"{type(exc).__name__}: {exc}", started)
        if decisions is None:
            verdict = self.default.verdict(a)
            summary = f"the script {self.filename} left the job to {verdict.policy}"
            if verdict.summary:
                summary += f": {verdict.summary}"
            return attrs.evolve(verdict, summary=summary,
                                elapsed_ms=(time.perf_counter() - started) * 1000)
        return Verdict(
            self.name, decisions, self._candidates(a, tier, decisions),
            self._summary(decisions), None, (time.perf_counter() - started) * 1000)

    def _request(self, a: Analysis, tier: bool | None) -> dict[str, Any]:
        data = a.snapshot
        now = float(data.get("now") or 0.0)
        local = time.localtime(now)
        workers = [w for w in a.workers if w.pool.avoided is tier]
        devices = [d for d in a.startable() if d.pool.avoided is tier]
        need = max((d.need for d in a.devices() if d.pool.reason is None), default=0)
        call = {
            "job": a.job,
            "info": {"now": now, "hour": local.tm_hour, "minute": local.tm_min,
                     "weekday": local.tm_wday, "queue_length": len(data.get("queue") or ()),
                     "memory_needed": need},
            "dispatchable": [[w.pool.index, w.index] for w in workers if not w.waitable],
            "starting": [[w.pool.index, w.index] for w in workers if w.waitable],
            "startable": [[d.pool.index, d.index] for d in devices],
        }
        return {"snapshot": data, "call": call,
                "queue": (data.get("queue") or []) if self._send_queue else None}

    def _fallback(self, a: Analysis, reason: str, message: str, started: float) -> Verdict:
        self.failures.labels(reason=reason).inc()
        what = _WHAT.get(reason, reason).format(budget=self.budget_ms)
        text = f"script {self.filename} {what} ({message})"
        log.warning("%s; %s decided job %s", text, self.default.name, a.job.get("job_id"))
        verdict = self.default.verdict(a)
        return attrs.evolve(verdict, fallback=text,
                            elapsed_ms=(time.perf_counter() - started) * 1000)

    # -- checking what the script returned --------------------------------------------------

    def _check(self, result: Any, a: Analysis, tier: bool | None) -> list[Decision] | None:
        if result is None:
            return None
        items = [result] if isinstance(result, dict) else result
        if not isinstance(items, list) or not items:
            raise ScriptError("garbage", f"schedule returned {_show(result)}, not a decision "
                                         "(a dict) or a non-empty list of decisions")
        if len(items) > MAX_DECISIONS:
            raise ScriptError("garbage", f"schedule returned {len(items)} decisions; at most "
                                         f"{MAX_DECISIONS} are allowed")
        decisions = [self._decision(item, a, tier) for item in items]
        placing = [d for d in decisions if d.action in ("dispatch", "wait", "fail")]
        if len(placing) > 1:
            raise ScriptError("invalid", "a job takes one dispatch or one wait, not "
                                         f"{', '.join(d.action for d in placing)}")
        return decisions

    def _decision(self, item: Any, a: Analysis, tier: bool | None) -> Decision:
        if not isinstance(item, dict):
            raise ScriptError("garbage", f"a decision must be a dict, got {_show(item)}")
        unknown = sorted(set(item) - _KEYS)
        if unknown:
            raise ScriptError("garbage", f"unknown decision key {unknown[0]!r}")
        for key, value in item.items():
            if value is not None and not isinstance(value, str):
                raise ScriptError("garbage", f"decision key {key!r} must be a string, got "
                                             f"{_show(value)}")
        action = item.get("action")
        pools = {p.pool_id: p for p in a.pools}
        pool = pools.get(item.get("pool_id"))  # type: ignore[arg-type]

        def need(*keys: str) -> None:
            for key in keys:
                if not item.get(key):
                    raise ScriptError("garbage", f"a {action} decision needs {key!r}")
            if "pool_id" in keys and pool is None:
                raise ScriptError("garbage", f"no pool {item['pool_id']!r} in the snapshot")

        def find_worker() -> dict[str, Any]:
            assert pool is not None
            for w in pool.data.get("workers") or ():
                if w.get("worker_id") == item["worker_id"]:
                    return w  # type: ignore[no-any-return]
            raise ScriptError("garbage", f"no worker {item['worker_id']!r} on pool "
                                         f"{pool.pool_id} in the snapshot")

        if action == "dispatch":
            need("pool_id", "worker_id")
            find_worker()
            view = next((w for w in a.workers if w.pool is pool
                         and w.worker_id == item["worker_id"]), None)
            if view is None:
                raise ScriptError("invalid", a.rejection(item["pool_id"], item["worker_id"])
                                  or f"worker {item['worker_id']} on pool {item['pool_id']} "
                                     f"does not hold {a.model}")
            if view.waitable:
                raise ScriptError("invalid", f"{view.label} is still starting")
            if view.pool.avoided is not tier:
                raise ScriptError("invalid", AVOIDED.format(view.pool.pool_id)
                                  + " and other pools can take the job")
        elif action == "start_worker":
            need("pool_id", "device")
            assert pool is not None
            model = item.get("model") or a.model
            device = next((d for d in a.devices() if d.pool is pool
                           and d.device == item["device"]), None)
            if device is None:
                raise ScriptError("garbage", f"no device {item['device']!r} on pool "
                                             f"{pool.pool_id} in the snapshot")
            if same_model(model, a.model, pool.aliases):
                if device.reason is not None:
                    raise ScriptError("invalid", device.reason)
                if device.pool.avoided is not tier:
                    raise ScriptError("invalid", AVOIDED.format(pool.pool_id)
                                      + " and other pools can take the job")
            elif pool.reason is not None or model_entry(pool.data, model) is None:
                raise ScriptError("invalid", pool.reason
                                  or f"pool {pool.pool_id} does not have {model} on disk")
            defaults = worker_defaults(a.snapshot, device.device)  # the built-ins' sizes
            # a model the device holds only split or in part: as the built-ins start it
            plan = device.plan if same_model(model, a.model, pool.aliases) else None
            return Decision("start_worker", pool_id=pool.pool_id, device=device.device,
                            model=model, reason=item.get("reason"), slots=defaults.get("slots"),
                            ctx=defaults.get("ctx"),
                            threads=device.cores or defaults.get("threads"),
                            # the job's kind: a worker for an embedding job embeds
                            embedding=(a.embedding and same_model(model, a.model, pool.aliases))
                            or None, n_gpu_layers=plan.n_gpu_layers if plan else None,
                            tensor_split=plan.split_by_index() if plan else None)
        elif action == "stop_worker":
            need("pool_id", "worker_id")
            find_worker()
        elif action == "wait":
            if item.get("pool_id") or item.get("worker_id"):
                need("pool_id", "worker_id")
                find_worker()
            return Decision("wait", pool_id=item.get("pool_id"), worker_id=item.get("worker_id"),
                            reason=item.get("reason") or f"the script {self.filename} chose "
                                                         "to wait")
        elif action == "download":  # pull on first use: rbees-orcd asks the pool
            need("pool_id")
            assert pool is not None
            if pool.reason is not None:
                raise ScriptError("invalid", pool.reason)
            return Decision("download", pool_id=pool.pool_id,
                            model=item.get("model") or a.model, reason=item.get("reason"))
        elif action == "fail":  # the job can never run: it ends with NO_CAPACITY
            if item.get("code") not in (None, "NO_CAPACITY"):
                raise ScriptError("garbage", "a fail decision's code can only be NO_CAPACITY")
            return Decision("fail", code="NO_CAPACITY", reason=item.get("reason")
                            or f"the script {self.filename} refused the job")
        else:
            raise ScriptError("garbage", f"unknown action {action!r} (use dispatch, "
                                         "start_worker, stop_worker, download, wait or "
                                         "fail)")
        return Decision(action, pool_id=item["pool_id"], worker_id=item["worker_id"],
                        reason=item.get("reason"))

    def _summary(self, decisions: list[Decision]) -> str:
        told = "; ".join(d.reason for d in decisions if d.reason and d.action != "wait")
        actions = "; then ".join(describe_decision(d) for d in decisions)
        text = f"the script {self.filename} chose to {actions}"
        return f"{text}: {told}" if told else text

    def _candidates(self, a: Analysis, tier: bool | None,
                    decisions: list[Decision]) -> list[Candidate]:
        chosen_workers = {(d.pool_id, d.worker_id) for d in decisions
                          if d.action in ("dispatch", "wait")}
        chosen_devices = {(d.pool_id, d.device) for d in decisions if d.action == "start_worker"}
        out = []
        for w in a.entries:
            if isinstance(w, Candidate):
                out.append(w)
                continue
            key = (w.pool.pool_id, w.worker_id)
            if key in chosen_workers:
                out.append(Candidate(*key, "worker", None, None))
            elif w.pool.avoided is not tier:
                out.append(Candidate(*key, "worker", None, AVOIDED.format(w.pool.pool_id)))
            else:
                out.append(Candidate(*key, "worker", None, f"the script chose otherwise "
                                                           f"than {w.label}"))
        if any(d.action == "dispatch" for d in decisions):
            return out  # devices were not in question
        for d in a.devices():
            key = (d.pool.pool_id, d.device)
            if key in chosen_devices:
                out.append(Candidate(*key, "device", None, None))
            elif d.reason is not None:
                out.append(Candidate(*key, "device", None, d.reason))
            elif d.pool.avoided is not tier:
                out.append(Candidate(*key, "device", None, AVOIDED.format(d.pool.pool_id)))
            else:
                out.append(Candidate(*key, "device", None, f"the script chose otherwise than "
                                                           f"{d.label}"))
        return out


def _show(value: Any) -> str:
    text = repr(value)
    kind = type(value).__name__
    return f"a {kind} {text[:60]}{'...' if len(text) > 60 else ''}"
