"""Counters of one expert cache, and the figures derived from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class CacheStats:
    """Plain counters; updated under the cache's lock.

    - accesses: (iteration, layer, expert) triples the router selected.
    - hits: accesses whose expert was fully resident when the layer needed it.
    - misses: the rest (an expert still in flight counts as a miss; its wait is stall time).
    - prefetched: copies made by prefetching; prefetch_used: of those, accessed before eviction.
    - host_computed: misses computed on the host instead of waiting for a copy (``--miss host|auto``).
    - precision = prefetch_used / prefetched; recall = prefetch_used / (prefetch_used + misses),
      i.e. of the accesses that needed a copy, the share a prefetch had already made.
    """

    accesses: int = 0
    hits: int = 0
    misses: int = 0
    stall_s: float = 0.0
    bytes_moved: int = 0
    copies: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    host_computed: int = 0

    def count_access(self, hit: bool, unused_prefetch: bool) -> None:
        """One access; ``unused_prefetch``: the expert was prefetched and not accessed since."""
        self.accesses += 1
        if hit:
            self.hits += 1
            self.prefetch_used += unused_prefetch
        else:
            self.misses += 1

    def count_copy(self, nbytes: int, prefetch: bool, late: bool) -> None:
        """One finished copy; ``late``: a prefetch its layer already asked for (a used prediction)."""
        self.copies += 1
        self.bytes_moved += nbytes
        if prefetch:
            self.prefetched += 1
            self.prefetch_used += late

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def precision(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    @property
    def recall(self) -> float:
        needed = self.prefetch_used + self.misses
        return self.prefetch_used / needed if needed else 0.0

    def to_dict(self) -> dict[str, float | int]:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, precision=self.precision, recall=self.recall)
        return d

    def merge(self, other: CacheStats) -> CacheStats:
        return CacheStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def minus(self, earlier: CacheStats) -> CacheStats:
        """Counters accumulated since ``earlier`` (a snapshot of the same cache)."""
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})
