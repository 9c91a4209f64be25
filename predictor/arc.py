"""Adaptive Replacement Cache bookkeeping (Megiddo & Modha, FAST '03) for one cache partition.

Plain Python: T1 (seen once recently) and T2 (seen at least twice) hold resident keys in LRU
order; B1 and B2 are ghost lists of recently evicted keys; p is the adaptive target size of T1.
The owner tells it about accesses, insertions and evictions, and asks ``victim(candidates)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable


class ARC:
    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.p = 0.0
        self.t1: OrderedDict[Hashable, None] = OrderedDict()
        self.t2: OrderedDict[Hashable, None] = OrderedDict()
        self.b1: OrderedDict[Hashable, None] = OrderedDict()
        self.b2: OrderedDict[Hashable, None] = OrderedDict()

    def access(self, key: Hashable) -> None:
        """A hit on a resident key moves it to T2's MRU end; a ghost hit adapts p."""
        if key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        elif key in self.t2:
            self.t2.move_to_end(key)
        elif key in self.b1:
            self.p = min(self.capacity, self.p + max(1.0, len(self.b2) / max(1, len(self.b1))))
        elif key in self.b2:
            self.p = max(0.0, self.p - max(1.0, len(self.b1) / max(1, len(self.b2))))

    def insert(self, key: Hashable) -> None:
        if key in self.t1 or key in self.t2:
            return
        if key in self.b1 or key in self.b2:  # seen before: frequent
            self.b1.pop(key, None)
            self.b2.pop(key, None)
            self.t2[key] = None
        else:
            self.t1[key] = None

    def evict(self, key: Hashable) -> None:
        if self.t1.pop(key, 0) is None:
            self.b1[key] = None
        elif self.t2.pop(key, 0) is None:
            self.b2[key] = None
        for ghost in (self.b1, self.b2):
            while len(ghost) > self.capacity:
                ghost.popitem(last=False)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        """ARC's REPLACE choice restricted to ``candidates``: LRU of T1 if T1 exceeds p, else LRU of T2."""
        allowed = set(candidates)
        first, second = (self.t1, self.t2) if len(self.t1) > max(self.p, 0) else (self.t2, self.t1)
        for lst in (first, second):
            for key in lst:
                if key in allowed:
                    return key
        return None

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)
