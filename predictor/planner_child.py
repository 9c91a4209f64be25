"""The planner process: ``python -m expertmap.predictor.planner_child DIR`` (started by
``ProcessPlanner``; see predictor/planner_process.py for the protocol).

Reads its ``PlannerSpec`` from stdin (length-prefixed pickle), then applies each event of the
ring to a ``NextUsePlanner`` in order, plans when no newer event waits, and writes the estimate
into the spare output buffer before flipping to it. Where the CPU keeps stores in order
(``spec.ordered_stores``) it follows the parent's event counter, polling for ``SPIN_S`` after its
last event and then sleeping on stdin (the parent writes a byte only to a sleeping child);
elsewhere it applies one event per byte read. Exits at end of input.
NumPy only: no torch, no transformers.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from expertmap.predictor.next_use import NextUseModel
from expertmap.predictor.next_use_plan import NextUsePlanner
from expertmap.predictor.planner_process import (
    BUSY, CURRENT, DONE, ERRORS, IDLE_AT, OFFSET, PLANS, POLL_S, READY, RESET, ROUTER, SKIPPED, SLEEPING, SLOTS, SPIN_S,
    START, USED, WRITTEN, Layout, PlannerSpec,
)  # fmt: skip
from expertmap.predictor.search import SearchIndex


class Child:
    def __init__(self, folder: Path, spec: PlannerSpec):
        self.folder, self.spec = folder, spec
        self.layout = Layout(folder / "ring", spec, create=False)
        self.planner = NextUsePlanner(spec.num_layers, spec.num_experts, spec.owned_layers, spec.num_slots,
                                      NextUseModel(spec.weights), spec.min_p, spec.prefetches, spec.distance)  # fmt: skip
        self.index_gen = 0
        self.done = 0

    def apply(self, slot: int) -> bool:
        """The event in ``slot``; True if a plan should follow it."""
        kind, a, b, c, at = (int(v) for v in self.layout.head[slot, : OFFSET + 1])
        payload = self.layout.payload[at:]  # this event's, from its offset in the ring
        J, H = self.spec.num_experts, self.spec.hidden_size
        if kind == START:
            self._load_index(c >> 1)
            embedding = payload[: self.spec.embed_dim].copy() if c & 1 else None
            self.planner.start(a, embedding, b)
            return True
        if kind == ROUTER:  # a: layer, b: router-input rows; c: 1 the distribution was sent, 2 derive the choice
            start = J if c & 1 else 0
            rows = payload[start : start + b * H].reshape(b, H)  # [T, H]
            routers = self.spec.routers
            probs = routers[a](rows) if b and a in routers else None  # [T, J]
            if c & 1:
                distribution = payload[:J].astype(np.float64)
            elif probs is not None:
                distribution = probs.mean(axis=0).astype(np.float64)  # [J]
            else:
                raise ValueError(f"router event of layer {a} with neither its distribution nor its router")
            gate = routers[a + 1](rows).max(axis=0) if b and a + 1 in routers else None  # [J], max over tokens
            self.planner.router(a, distribution, gate)
            if c & 2:  # the model's choice is the router's top-k: the layer's use event, here
                self.planner.used(a, routers[a].chosen(probs))
                return True
            return self.planner.plans_after_router(a)
        if kind == USED:
            self.planner.used(a, payload[:b].astype(np.int64).tolist())
            return True
        if kind == RESET:
            self.planner.reset()
            self._publish()
            return False
        raise ValueError(f"unknown planner event kind {kind} in slot {slot}")

    def _load_index(self, gen: int) -> None:
        if gen <= self.index_gen:
            return
        path = self.folder / f"index-{gen}.npy"
        with open(path, "rb") as f:  # ProcessPlanner.ship_index: embeddings [N, D], then maps [N, L, J]
            embeddings, maps = np.load(f), np.load(f)
        self.planner.index = SearchIndex(embeddings, maps) if len(embeddings) else None
        for old in self.folder.glob("index-*.npy"):  # older snapshots are not named again
            if old != path and int(old.name.split("-")[1].split(".")[0]) < gen:
                old.unlink(missing_ok=True)
        self.index_gen = gen

    def _publish(self) -> None:
        """The planner's estimate into the spare buffer, then flip to it."""
        lay, p = self.layout, self.planner
        b = 1 - int(lay.ctrl[CURRENT])
        lay.t[b] = p.t
        n = len(p.plan_keys)
        lay.keys[b, :n] = p.plan_keys
        lay.key_t[b, :n] = p.plan_t
        lay.count[b] = n
        lay.ctrl[CURRENT] = b
        lay.ctrl[PLANS] += 1

    def run(self, stdin: int) -> None:
        lay, ordered = self.layout, self.spec.ordered_stores
        lay.ctrl[READY] = 1
        owed = False
        available = 0  # events known to be in the ring: bytes read, or the parent's counter
        idle_since = time.monotonic()
        while True:
            if ordered:
                available = int(lay.ctrl[WRITTEN])
            if available == self.done:  # nothing to apply: poll a while, then sleep on stdin
                lay.ctrl[IDLE_AT] = self.done
                if ordered and time.monotonic() - idle_since < SPIN_S:
                    time.sleep(POLL_S)
                    continue
                lay.ctrl[SLEEPING] = 1
                if ordered and int(lay.ctrl[WRITTEN]) > self.done:
                    lay.ctrl[SLEEPING] = 0
                    continue
                data = os.read(stdin, 4096)
                lay.ctrl[SLEEPING] = 0
                if not data:
                    return
                available += 0 if ordered else len(data)
                idle_since = time.monotonic()
                continue
            t0 = time.process_time()
            while self.done < available:
                try:
                    owed = self.apply(self.done % SLOTS) or owed
                except Exception:  # a planner bug must not take serving down: say it, keep going
                    lay.ctrl[ERRORS] += 1
                    traceback.print_exc(file=sys.stderr)
                self.done += 1
                lay.ctrl[DONE] = self.done
            waiting = int(lay.ctrl[WRITTEN]) > self.done if ordered else bool(select.select([stdin], [], [], 0)[0])
            if owed and waiting:
                lay.ctrl[SKIPPED] += 1  # newer events wait: this position's plan would be stale
            elif owed:
                try:
                    self.planner.plan()
                    self._publish()
                except Exception:
                    lay.ctrl[ERRORS] += 1
                    traceback.print_exc(file=sys.stderr)
                owed = False
            lay.fctrl[BUSY] += time.process_time() - t0
            idle_since = time.monotonic()


def main() -> None:
    folder = Path(sys.argv[1])
    stdin = sys.stdin.buffer.fileno()
    (size,) = struct.unpack("<Q", _read_exactly(stdin, 8))
    spec = pickle.loads(_read_exactly(stdin, size))
    Child(folder, spec).run(stdin)


def _read_exactly(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise SystemExit("planner: input ended before the spec")
        out += chunk
    return out


if __name__ == "__main__":
    main()
