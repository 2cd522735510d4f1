"""A sorted set of distinct integers with O(log n) add, remove and rank.

The keys live in buckets of a few hundred sorted integers (a list insert of that size is a
short ``memmove``); a Fenwick tree over the bucket lengths answers "how many keys are smaller"
in O(log n). Buckets split when they grow past ``2 * LOAD`` and merge with a neighbour when
they shrink below ``LOAD // 4``; both rebuild the tree, which amortises to O(1) per operation.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

LOAD = 256


class SortedKeys:
    """Distinct ``int`` keys in ascending order. Not thread-safe."""

    __slots__ = ("_buckets", "_len", "_maxes", "_tree")

    def __init__(self) -> None:
        self._buckets: list[list[int]] = []
        self._maxes: list[int] = []
        self._tree: list[int] = [0]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for bucket in self._buckets:
            yield from bucket

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, int):
            return False
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return False
        bucket = self._buckets[i]
        j = bisect_left(bucket, key)
        return j < len(bucket) and bucket[j] == key

    def first(self) -> int | None:
        """The smallest key, or None when empty."""
        return self._buckets[0][0] if self._buckets else None

    def add(self, key: int) -> None:
        """Insert ``key``; KeyError if it is already present."""
        if not self._buckets:
            self._buckets.append([key])
            self._maxes.append(key)
            self._rebuild()
            self._len = 1
            return
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            i -= 1
            bucket = self._buckets[i]
            bucket.append(key)
            self._maxes[i] = key
        else:
            bucket = self._buckets[i]
            j = bisect_left(bucket, key)
            if bucket[j] == key:  # j < len(bucket) because key <= the bucket's max
                raise KeyError(key)
            bucket.insert(j, key)
        self._len += 1
        if len(bucket) > 2 * LOAD:
            self._buckets[i:i + 1] = [bucket[:LOAD], bucket[LOAD:]]
            self._maxes[i:i + 1] = [bucket[LOAD - 1], bucket[-1]]
            self._rebuild()
        else:
            self._update(i, 1)

    def remove(self, key: int) -> None:
        """Delete ``key``; KeyError if it is absent."""
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            raise KeyError(key)
        bucket = self._buckets[i]
        j = bisect_left(bucket, key)
        if bucket[j] != key:
            raise KeyError(key)
        del bucket[j]
        self._len -= 1
        if not bucket:
            del self._buckets[i]
            del self._maxes[i]
            self._rebuild()
            return
        self._maxes[i] = bucket[-1]
        if len(bucket) < LOAD // 4 and len(self._buckets) > 1:
            k = i if i + 1 < len(self._buckets) else i - 1
            merged = self._buckets[k] + self._buckets[k + 1]
            if len(merged) > 2 * LOAD:
                half = len(merged) // 2
                parts = [merged[:half], merged[half:]]
            else:
                parts = [merged]
            self._buckets[k:k + 2] = parts
            self._maxes[k:k + 2] = [p[-1] for p in parts]
            self._rebuild()
        else:
            self._update(i, -1)

    def rank(self, key: int) -> int:
        """How many keys are smaller than ``key`` (its index when present)."""
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return self._len
        return self._prefix(i) + bisect_left(self._buckets[i], key)

    def _rebuild(self) -> None:
        n = len(self._buckets)
        tree = [0] * (n + 1)
        for i, bucket in enumerate(self._buckets, 1):
            tree[i] += len(bucket)
            parent = i + (i & -i)
            if parent <= n:
                tree[parent] += tree[i]
        self._tree = tree

    def _update(self, index: int, delta: int) -> None:
        i, n = index + 1, len(self._tree)
        while i < n:
            self._tree[i] += delta
            i += i & -i

    def _prefix(self, count: int) -> int:
        """Total length of the first ``count`` buckets."""
        total, i = 0, count
        while i > 0:
            total += self._tree[i]
            i -= i & -i
        return total
