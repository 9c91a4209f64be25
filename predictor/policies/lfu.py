"""`lfu`: load on a miss, evict the least frequently used expert (ties: least recently used).

Frequencies count every access over the whole run and survive eviction, so a popular expert
that was pushed out comes back with its history.
"""

from collections import Counter

from expertmap.predictor.policies.base import Key, Policy


class LFU(Policy):
    name = "lfu"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.freq: Counter[Key] = Counter()

    def reset(self):
        super().reset()
        self.freq.clear()

    def on_access(self, key, hit):
        super().on_access(key, hit)
        self.freq[key] += 1

    def choose_victim(self, candidates, incoming=None):
        return min(candidates, key=lambda k: (self.freq[k], self._recency.get(k, 0)))
