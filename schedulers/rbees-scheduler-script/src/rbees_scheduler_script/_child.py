"""The sandbox process that runs one Starlark policy (started by :mod:`.sandbox`).

Run as ``python -I _child.py MEMORY_BYTES``; it imports only the standard library and
``starlark``, so it starts quickly. It caps its own address space, then speaks frames on
stdin/stdout: a 4-byte big-endian length and a body, pickled from the parent (trusted) and
JSON back to it (the parent never unpickles what a sandbox sends).

1. ``{"source", "filename", "deadline"}``: load the script; reply ``{"ok": true}`` or
   ``{"ok": false, "error"}``.
2. then per decision ``{"snapshot", "pools": {"count", "changed": {index: pool}}, "queue",
   "call", "deadline"}``: reply ``{"ok": true, "result"}`` or ``{"ok": false, "reason":
   "timeout"|"error"|"garbage"|"memory"|"crash"|"need-queue", "error"}``; after ``memory``
   and ``crash`` the process exits. ``need-queue``: the script called ``ctx.queue()`` and the
   request carried no queue; the parent sends it again with the queue.

The parent sends only the pools that changed since this process last saw them. Each pool
becomes a frozen Starlark module, rebuilt only when the pool changed, so a decision converts
one or two pools, not a hundred. Frozen values are immutable, so a script cannot corrupt
what the next decision sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import struct
import sys
import time
from typing import Any

import starlark as sl

PRELUDE = '''
def make_ctx(pools, call, queue_text):
    job = call["job"]
    info = call["info"]
    model = job.get("model")
    by_id = {p["pool_id"]: p for p in pools}
    dispatchable = [pools[i]["workers"][j] for i, j in call["dispatchable"]]
    starting = [pools[i]["workers"][j] for i, j in call["starting"]]
    startable = [pools[i]["devices"][j] for i, j in call["startable"]]
    queue_cache = []

    def queue():
        if not queue_cache:
            queue_cache.append(json.decode(queue_text()))
        return queue_cache[0]

    def pool(pool_id):
        return by_id.get(pool_id)

    def _pool_of(p):
        return by_id.get(p) if type(p) == "string" else p

    def holds(p, worker, m = None):
        m = m or model
        p = _pool_of(p)
        ids = p["model_ids"] if p else {}
        r = worker.get("model_ref")
        return r == m or ids.get(r, r) == ids.get(m, m)

    def has_model(p, m = None):
        m = m or model
        p = _pool_of(p)
        return p != None and m in p["model_names"]

    def workers_with_model(m = None):
        m = m or model
        out = []
        for p in pools:
            ids = p["model_ids"]
            c = ids.get(m, m)
            for w in p["workers"]:
                r = w.get("model_ref")
                if r == m or ids.get(r, r) == c:
                    out.append(w)
        return out

    def free_slots(worker):
        return worker.get("slots_free") or 0

    def device(p, name):
        p = _pool_of(p)
        if p == None:
            return None
        for d in p["devices"]:
            if d["device"] == name:
                return d
        return None

    def device_free(p, name):
        d = device(p, name)
        return d["free_bytes"] if d else 0

    def is_gpu(d):
        if type(d) == "dict":
            d = d.get("kind") or d.get("device", "cpu")
        return d.split(":")[0] != "cpu"

    def _clean(d):
        return {k: v for k, v in d.items() if v != None}

    def dispatch(worker, reason = None):
        return _clean({"action": "dispatch", "pool_id": worker["pool_id"],
                       "worker_id": worker["worker_id"], "reason": reason})

    def start(dev, m = None, reason = None):
        return _clean({"action": "start_worker", "pool_id": dev["pool_id"],
                       "device": dev["device"], "model": m or model, "reason": reason})

    def wait(reason):
        return {"action": "wait", "reason": reason}

    def download(pool_id, m = None, reason = None):
        return _clean({"action": "download", "pool_id": pool_id, "model": m or model,
                       "reason": reason})

    def refuse(reason):
        return {"action": "fail", "code": "NO_CAPACITY", "reason": reason}

    return struct(
        job = job, model = model, priority = job.get("priority"),
        placement = job.get("placement") or {}, pools = pools, now = info["now"],
        hour = info["hour"], minute = info["minute"], weekday = info["weekday"],
        queue_length = info["queue_length"], memory_needed = info["memory_needed"],
        dispatchable = dispatchable, starting = starting, startable = startable,
        queue = queue, pool = pool, holds = holds, has_model = has_model,
        workers_with_model = workers_with_model, free_slots = free_slots, device = device,
        device_free = device_free, is_gpu = is_gpu, dispatch = dispatch, start = start,
        wait = wait, refuse = refuse, download = download,
    )
'''

GLOBALS = sl.Globals.extended_by([
    sl.LibraryExtension.StructType, sl.LibraryExtension.Json, sl.LibraryExtension.Map,
    sl.LibraryExtension.Filter, sl.LibraryExtension.Partial, sl.LibraryExtension.Typing,
])


def dialect(load: bool) -> sl.Dialect:
    d = sl.Dialect.extended()
    d.enable_load = load
    return d


class Cancelled(Exception):
    pass


class Garbage(Exception):
    pass


def short_error(exc: BaseException) -> str:
    """The ``error:`` line of a Starlark traceback with the innermost location."""
    lines = str(exc).splitlines()
    message = next((ln[len("error: "):] for ln in lines if ln.startswith("error: ")),
                   lines[-1] if lines else type(exc).__name__)
    where = ""
    for ln in lines:
        s = ln.strip()
        if s.startswith("--> "):
            where = s[4:]
        elif s.startswith("* ") and ", in " in s and not where:
            where = s[2:].split(", in ")[0]
    return f"{where}: {message}" if where else message


def frozen_value(name: str, json_text: str) -> sl.FrozenModule:
    m = sl.Module()
    m["_text"] = json_text
    sl.eval(m, sl.parse("value", f"{name} = json.decode(_text)", dialect(False)), GLOBALS)
    return m.freeze()


def model_names(pool: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    ids: dict[str, str] = {}
    names: list[str] = []
    for entry in pool.get("models") or ():
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, dict):
            names += [v for v in (entry.get("id"), entry.get("ref")) if isinstance(v, str)]
            if isinstance(entry.get("ref"), str) and isinstance(entry.get("id"), str):
                ids[entry["ref"]] = entry["id"]
    return ids, names


def pool_value(pool: dict[str, Any], tokens: list[Any]) -> sl.FrozenModule:
    pool_id = pool.get("pool_id")
    ids, names = model_names(pool)
    workers = [{**w, "pool_id": pool_id, "tokens_per_s": tokens[i] if tokens else None}
               for i, w in enumerate(pool.get("workers") or ())]
    devices = [{**d, "pool_id": pool_id,
                "free_bytes": max(0, int(d.get("memory_free_bytes") or 0)
                                  - int(d.get("memory_reserved_bytes") or 0))}
               for d in pool.get("devices") or ()]
    data = {**pool, "workers": workers, "devices": devices, "model_ids": ids,
            "model_names": names}
    return frozen_value("P", json.dumps(data))


class NeedQueue(Exception):
    pass


class Runner:
    def __init__(self, source: str, filename: str, deadline: float) -> None:
        self.deadline = deadline
        self.options = sl.EvalOptions(check_cancelled=self._cancelled, max_callstack_size=200)
        module = sl.Module()
        sl.eval_with(self.options, module, sl.parse(filename, source, dialect(False)), GLOBALS)
        self.policy = module.freeze()
        prelude = sl.Module()
        sl.eval(prelude, sl.parse("rbees.star", PRELUDE, dialect(False)), GLOBALS)
        self.modules: dict[str, sl.FrozenModule] = {"policy": self.policy,
                                                     "rbees": prelude.freeze()}
        check = sl.Module()
        sl.eval_with(self.options, check, sl.parse(
            "check", 'load("policy", "schedule")\nOK = type(schedule) == "function"',
            dialect(True)), GLOBALS, sl.FileLoader(self._load))
        if not check["OK"]:
            raise ValueError("schedule is not a function")
        # the pools as last sent, their tokens/s, and their frozen values (None: not yet)
        self.raw: list[dict[str, Any]] = []
        self.tokens: list[list[Any]] = []
        self.frozen: list[sl.FrozenModule | None] = []
        self.drivers: dict[int, sl.AstModule] = {}
        self.needs_queue = False

    def _cancelled(self) -> bool:
        return time.monotonic() > self.deadline

    def _load(self, name: str) -> sl.FrozenModule:
        if name.startswith("pool/"):
            module = self.frozen[int(name[5:])]
            assert module is not None
            return module
        return self.modules[name]

    def _driver(self, n: int) -> sl.AstModule:
        ast = self.drivers.get(n)
        if ast is None:
            lines = ['load("rbees", "make_ctx")', 'load("policy", "schedule")']
            lines += [f'load("pool/{i}", _p{i} = "P")' for i in range(n)]
            pools = ", ".join(f"_p{i}" for i in range(n))
            lines.append(f"RESULT = schedule(make_ctx([{pools}], json.decode(_call), _queue))")
            ast = self.drivers[n] = sl.parse("driver", "\n".join(lines), dialect(True))
        return ast

    def update(self, pools: dict[str, Any]) -> None:
        """Apply what changed since the last request: ``{"count", "changed": {i: pool}}``."""
        n = pools["count"]
        del self.raw[n:], self.tokens[n:], self.frozen[n:]
        while len(self.raw) < n:
            self.raw.append({})
            self.tokens.append([])
            self.frozen.append(None)
        for i, pool in pools["changed"].items():
            self.raw[i] = pool
            self.frozen[i] = None

    def decide(self, request: dict[str, Any]) -> Any:
        self.deadline = request["deadline"]
        self.update(request["pools"])
        throughput = request["snapshot"].get("throughput") or {}
        for i, pool in enumerate(self.raw):
            tokens = ([throughput.get(f"{pool.get('pool_id')}/{w.get('worker_id')}")
                       for w in pool.get("workers") or ()] if throughput else [])
            if self.frozen[i] is not None and self.tokens[i] == tokens:
                continue
            self.frozen[i] = pool_value(pool, tokens)
            self.tokens[i] = tokens
            if self._cancelled():
                raise Cancelled
        queue = request.get("queue")
        self.needs_queue = False

        def queue_text() -> str:
            if queue is None:
                self.needs_queue = True
                raise NeedQueue("the queue was not sent")
            return json.dumps(queue)

        module = sl.Module()
        module["_call"] = json.dumps(request["call"])
        module.add_callable("_queue", queue_text)
        try:
            sl.eval_with(self.options, module, self._driver(len(self.raw)), GLOBALS,
                         sl.FileLoader(self._load))
        except Exception:
            if self.needs_queue:
                raise NeedQueue from None
            raise
        try:
            return module["RESULT"]
        except Exception as exc:  # a function, a type ...: nothing the parent could read
            raise Garbage(f"schedule returned a value that is not plain data ({exc})") from exc


def read_frame(stream: Any) -> bytes | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head)
    body: bytes = stream.read(size)
    return body if len(body) == size else None


def write_frame(stream: Any, data: dict[str, Any]) -> None:
    try:
        body = json.dumps(data, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        body = json.dumps({"ok": False, "reason": "garbage",
                           "error": f"the result is not plain data ({exc})"}).encode()
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def limit_memory(extra: int) -> None:
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    limit = used + extra
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        which = getattr(resource, name, None)
        if which is None:
            continue
        # not every platform lets it be set (macOS: RLIMIT_AS)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (limit, limit))


def main() -> int:
    limit_memory(int(sys.argv[1]))
    # no nice(): on a host whose cores are busy (inference workers), a lower priority starves
    # every decision, and it does not make the kill of a runaway script any faster
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames goes to the parent
    frame = read_frame(stdin)
    if frame is None:
        return 1
    init = pickle.loads(frame)
    try:
        runner = Runner(init["source"], init["filename"], init["deadline"])
    except Exception as exc:  # the script did not load: the parent reports it
        write_frame(stdout, {"ok": False, "error": short_error(exc)})
        return 1
    write_frame(stdout, {"ok": True})
    while (frame := read_frame(stdin)) is not None:
        try:
            result = runner.decide(pickle.loads(frame))
            write_frame(stdout, {"ok": True, "result": result})
        except Cancelled:
            write_frame(stdout, {"ok": False, "reason": "timeout", "error": "cancelled"})
        except NeedQueue:
            write_frame(stdout, {"ok": False, "reason": "need-queue", "error": "send the queue"})
        except Garbage as exc:
            write_frame(stdout, {"ok": False, "reason": "garbage", "error": str(exc)})
        except MemoryError:
            write_frame(stdout, {"ok": False, "reason": "memory", "error": "out of memory"})
            return 2
        except sl.StarlarkError as exc:
            text = short_error(exc)
            reason = "timeout" if "cancelled" in text.lower() else "error"
            write_frame(stdout, {"ok": False, "reason": reason, "error": text})
        except Exception as exc:
            write_frame(stdout, {"ok": False, "reason": "error", "error": short_error(exc)})
        except BaseException as exc:  # pyo3 panics: out of memory, or a bug in the runtime
            text = str(exc) or type(exc).__name__
            reason = "memory" if "memory" in text.lower() else "crash"
            write_frame(stdout, {"ok": False, "reason": reason, "error": text})
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
