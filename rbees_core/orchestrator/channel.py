"""One job's event stream inside rbees-orcd: history, live subscribers, pending writes.

Event ids are the store's: 1, 2, 3... per job, in publication order. Publishing hands the
event to every subscriber at once; the store receives it in the next flush (tokens) or
before it is published (transitions, which the caller writes first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

TERMINAL = frozenset({"end", "error"})
Event = tuple[int, str, dict[str, Any]]
#: what a subscriber is given each event with, synchronously, as it is published
Deliver = Callable[[Event], object]


class Channel:
    def __init__(self, job_id: str, history: list[Event] | None = None,
                 dirty: set[Channel] | None = None) -> None:
        self.job_id = job_id
        #: where the channel registers itself when it holds unwritten events
        self.dirty = dirty
        self.history: list[Event] = list(history or [])
        #: each subscriber's deliver (a queue's ``put_nowait``, or a stream's own sink); a
        #: tuple, replaced on change, so that a deliver may detach (itself or another)
        #: while publish iterates it
        self.subscribers: tuple[Deliver, ...] = ()
        self.unpersisted: list[tuple[str, dict[str, Any]]] = []

    @property
    def last_id(self) -> int:
        return self.history[-1][0] if self.history else 0

    @property
    def done(self) -> bool:
        return bool(self.history) and self.history[-1][1] in TERMINAL

    def publish(self, event: str, data: dict[str, Any], *, persisted: bool) -> int:
        if self.done:
            return self.last_id
        event_id = self.last_id + 1
        item = (event_id, event, data)
        self.history.append(item)
        if not persisted:
            self.unpersisted.append((event, data))
            if self.dirty is not None:
                self.dirty.add(self)
        for deliver in self.subscribers:
            deliver(item)
        return event_id

    def take_unpersisted(self) -> list[tuple[str, dict[str, Any]]]:
        pending, self.unpersisted = self.unpersisted, []
        return pending

    def subscribe(self, after: int) -> tuple[list[Event], asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._add(queue.put_nowait)
        return [e for e in self.history if e[0] > after], queue

    def attach(self, after: int, deliver: Deliver) -> None:
        """Give ``deliver`` the events after event ``after`` now, then each one as it is
        published (until :meth:`detach`): no queue and no task between the channel and
        a stream that has its own queue (a task wake-up per relayed token less)."""
        for item in self.history:
            if item[0] > after:
                deliver(item)
        if not self.done:
            self._add(deliver)

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self.detach(queue.put_nowait)

    def detach(self, deliver: Deliver) -> None:
        self.subscribers = tuple(d for d in self.subscribers if d != deliver)

    def _add(self, deliver: Deliver) -> None:
        if deliver not in self.subscribers:
            self.subscribers += (deliver,)
