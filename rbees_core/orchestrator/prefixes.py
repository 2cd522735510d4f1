"""Which worker holds how much of a job's prompt: prefix-aware routing's memory.

A worker's slots keep the tokens of the jobs they ran (the llama.cpp backend re-feeds only
what differs: ``begin(slot, params, keep=n)``), so a job whose prompt begins like one a
worker ran lately starts sooner there: the second turn of a chat, jobs sharing a system
prompt. The orchestrator is the one that routes, and it knows what it sent where; it keeps,
per worker, the prefix keys of the last :data:`JOBS_PER_WORKER` jobs it dispatched there
(:class:`PrefixBook`), and tells the policy, per worker, how many characters of the job's
prompt the longest of them covers: the snapshot's ``prefix_match``
(``{"<pool_id>/<worker_id>": chars}``, only workers that hold some).

Keys (:func:`prefix_keys`): for a chat, a hash of each cumulative message prefix
(``messages[:1]``, ``messages[:2]``, ...), its weight the characters of their contents; for a
prompt, a hash of the prompt at every :data:`PROMPT_STEP` characters and of the whole, its
weight the characters. The tools a chat offers are part of its first key (a template writes
them before the messages).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

#: prompt keys are taken at every this many characters
PROMPT_STEP = 256
#: at most this many keys per job (a longer prompt's keys stop there)
MAX_KEYS = 512
#: the jobs remembered per worker (the oldest is forgotten first)
JOBS_PER_WORKER = 64

Key = tuple[bytes, int]  # (hash, characters of the prompt it covers)


def prefix_keys(body: dict[str, Any] | None) -> list[Key]:
    """The prefix keys of a worker request (``POST /v2/execute`` body: ``prompt`` or
    ``messages``), shortest first; ``[]`` when it has neither. Called by the dispatcher."""
    if not body:
        return []
    h = hashlib.blake2b(digest_size=12)
    keys: list[Key] = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        h.update(b"p")
        n = len(prompt)
        for start in range(0, n, PROMPT_STEP):
            h.update(prompt[start:start + PROMPT_STEP].encode("utf-8", "surrogatepass"))
            keys.append((h.copy().digest(), min(n, start + PROMPT_STEP)))
            if len(keys) >= MAX_KEYS:
                break
        return keys
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    h.update(b"m")
    if body.get("tools"):
        h.update(json.dumps(body["tools"], sort_keys=True, default=str).encode())
    chars = 0
    for message in messages[:MAX_KEYS]:
        text = json.dumps(message, sort_keys=True, default=str)
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
        content = message.get("content") if isinstance(message, dict) else None
        chars += len(content) if isinstance(content, str) else len(text)
        keys.append((h.copy().digest(), chars))
    return keys


class PrefixBook:
    """Per worker, the prefix keys of the jobs the orchestrator dispatched there lately.

    The dispatcher calls :meth:`dispatched` when it claims a slot and :meth:`matches` when
    it builds a job's snapshot; :meth:`forget` when a worker stops, :meth:`keep_only` to
    drop workers that are gone. Bounded: :data:`JOBS_PER_WORKER` jobs per worker.
    """

    def __init__(self, jobs_per_worker: int = JOBS_PER_WORKER) -> None:
        self.jobs_per_worker = jobs_per_worker
        #: (pool_id, worker_id) -> job id -> its keys, oldest first
        self._jobs: dict[tuple[str, str], OrderedDict[str, list[Key]]] = {}
        #: hash -> (pool_id, worker_id) -> [weight, jobs holding it]
        self._index: dict[bytes, dict[tuple[str, str], list[int]]] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def workers(self) -> list[tuple[str, str]]:
        """The workers with a record."""
        return list(self._jobs)

    def dispatched(self, pool_id: str, worker_id: str, job_id: str, keys: list[Key]) -> None:
        """Remember that ``job_id`` (its ``keys``) went to the worker."""
        if not keys:
            return
        where = (pool_id, worker_id)
        jobs = self._jobs.setdefault(where, OrderedDict())
        if job_id in jobs:
            self._drop(where, jobs.pop(job_id))
        jobs[job_id] = keys
        index = self._index
        for digest, weight in keys:
            held = index.setdefault(digest, {})
            entry = held.get(where)
            if entry is None:
                held[where] = [weight, 1]
            else:
                entry[1] += 1
        while len(jobs) > self.jobs_per_worker:
            _, old = jobs.popitem(last=False)
            self._drop(where, old)

    def _drop(self, where: tuple[str, str], keys: list[Key]) -> None:
        index = self._index
        for digest, _ in keys:
            held = index.get(digest)
            entry = held.get(where) if held is not None else None
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] <= 0:
                del held[where]  # type: ignore[union-attr]
                if not held:
                    del index[digest]

    def matches(self, keys: list[Key]) -> dict[str, int]:
        """``{"<pool_id>/<worker_id>": chars}``: per worker holding some of ``keys``, the
        weight of the longest it holds (the snapshot's ``prefix_match``)."""
        out: dict[str, int] = {}
        index = self._index
        for digest, weight in reversed(keys):
            held = index.get(digest)
            if not held:
                continue
            for pool_id, worker_id in held:
                out.setdefault(f"{pool_id}/{worker_id}", weight)
        return out

    def forget(self, pool_id: str, worker_id: str) -> None:
        """The worker stopped: its slots hold nothing any more."""
        jobs = self._jobs.pop((pool_id, worker_id), None)
        for keys in (jobs or {}).values():
            self._drop((pool_id, worker_id), keys)

    def keep_only(self, live: set[tuple[str, str]]) -> None:
        """Forget every worker not in ``live``."""
        for where in [w for w in self._jobs if w not in live]:
            self.forget(*where)
