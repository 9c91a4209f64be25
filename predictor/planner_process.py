"""`hybrid`'s planner in a process of its own, so that its work leaves the serving interpreter.

Python runs one thread at a time: a planner thread beside a Python-bound compute thread makes the
compute thread wait for it (bench/results/prediction_cost). ``ProcessPlanner`` runs the
``NextUsePlanner`` in a child process (``python -m expertmap.predictor.planner_child``) instead:

- the compute thread writes each event into a slot of a ring in shared memory (a file under
  /dev/shm, memory-mapped by both) and bumps an event counter: no lock, no thread of this
  interpreter to wake, no system call while the child is polling. The slot holds the event's
  kind and numbers; its payload follows the previous event's in a byte ring, so that the small
  events of decode steps share memory pages. The writes go through ``memoryview``s, not NumPy:
  on a compute thread whose caches the model has just filled, each NumPy or torch call costs
  microseconds (bench/results/prediction_cost). A router event carries the
  layer's router input; the child applies the layer's router and the next layer's
  (``spec.routers``, NumPy) for the layer's distribution, the cross-layer gate and, where the
  model's choice is the router's top-k, the layer's chosen experts, so a layer costs the compute
  thread one event;
- the child polls the counter for ``SPIN_S`` after its last event, then sleeps on its stdin; the
  compute thread writes a byte there only to a sleeping child. Where the CPU may reorder one
  thread's stores (not x86-64), a byte goes with every event and orders the slot instead: the
  child applies one event per byte read (the pipe's write and read are barriers);
- the child applies the events, plans when no newer event waits (an older position's plan is
  stale, as in ``BackgroundPlanner``), and writes the estimate ``t`` [L, J] and the plan into the
  spare of two output buffers before flipping to it;
- the cache reads the current buffer. Estimates are advisory: a read that overlaps a flip sees a
  mix of two consecutive estimates, never anything else;
- the store's arrays reach the child as files written by a thread here (``ship_index``, after a
  version change the replica noticed); the next iteration-start event names the newest one;
- a full ring (the child more than ``SLOTS`` events behind) drops the event and counts it.

The child exits when its stdin closes (``close`` or this process's end).
"""

from __future__ import annotations

import logging
import os
import pickle
import platform
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expertmap.predictor.linear_router import LinearRouter
from expertmap.predictor.next_use_distance import DistanceModel

logger = logging.getLogger(__name__)

SLOTS = 128  # events in flight
PAYLOAD_BYTES = 1 << 18  # per event at most: a router event's input rows [T, H] float32 up to this size (the last ones)
ALIGN = 64  # bytes: each event's payload starts on a cache line
START, ROUTER, USED, RESET = 1, 2, 3, 4  # event kinds (head[0])
HEAD = 8  # int64 words per slot: kind, three numbers, the payload's offset in floats, spare
OFFSET = 4  # head word: the payload's offset
# ctrl words (int64)
READY, DONE, PLANS, CURRENT, ERRORS, SKIPPED, IDLE_AT, WRITTEN, SLEEPING = range(9)  # IDLE_AT: DONE when it last went idle
SPIN_S = 0.02  # the child polls this long after its last event before it sleeps on stdin
POLL_S = 1e-4  # between polls
BUSY = 0  # fctrl (float64): the child's CPU seconds


class PlannerProcessError(RuntimeError):
    """The planner process could not start or stopped."""


@dataclass(frozen=True)
class PlannerSpec:
    """What the child needs to build its ``NextUsePlanner``, its routers and its layout."""

    num_layers: int
    num_experts: int
    owned_layers: tuple[int, ...]
    num_slots: int
    weights: tuple[tuple[float, ...], ...]  # NextUseModel.weights
    min_p: float
    prefetches: bool
    embed_dim: int
    hidden_size: int
    routers: dict[int, LinearRouter] = field(default_factory=dict)  # MoE layer -> its router (this cache's)
    distance: DistanceModel | None = None  # the next-use distance model, where hybrid has one
    #: the CPU keeps one thread's stores in order (x86-64): the child may follow the parent's event
    #: counter; elsewhere a byte per event orders the ring (the pipe's write and read are barriers)
    ordered_stores: bool = field(default_factory=lambda: platform.machine().lower() in ("x86_64", "amd64"))

    @property
    def payload_floats(self) -> int:
        return max(self.embed_dim, self.num_experts + self.hidden_size, PAYLOAD_BYTES // 4)

    @property
    def max_rows(self) -> int:
        """Router-input rows a router event carries (the last ones when a step has more)."""
        return (self.payload_floats - self.num_experts) // self.hidden_size

    @property
    def ring_floats(self) -> int:
        """The payload ring: room for ``SLOTS`` events in flight of the largest size, each
        aligned, and the tail one that does not fit before the end wastes."""
        return (SLOTS + 2) * (self.payload_floats + ALIGN // 4)


class Layout:
    """The shared file carved into NumPy views (the same offsets in both processes)."""

    def __init__(self, path: Path, spec: PlannerSpec, create: bool):
        L, J, S = spec.num_layers, spec.num_experts, spec.num_slots
        parts = [
            ("ctrl", np.int64, (16,)), ("fctrl", np.float64, (4,)), ("head", np.int64, (SLOTS, HEAD)),
            ("t", np.float64, (2, L, J)), ("keys", np.int64, (2, S)), ("key_t", np.float64, (2, S)),
            ("count", np.int64, (2,)), ("payload", np.float32, (spec.ring_floats,)),
        ]  # fmt: skip
        size = sum(np.dtype(d).itemsize * int(np.prod(s)) for _, d, s in parts)
        self.memory = np.memmap(path, dtype=np.uint8, mode="w+" if create else "r+", shape=(size,))
        offset = 0
        for name, dtype, shape in parts:
            n = np.dtype(dtype).itemsize * int(np.prod(shape))
            # plain ndarrays over the map (np.memmap's own views index through Python: slow)
            setattr(self, name, np.ndarray(shape, dtype, buffer=self.memory, offset=offset))
            offset += n
        if create:
            self.t[:] = 1e6

    def words(self, part: np.ndarray, fmt: str) -> memoryview:
        """A flat ``memoryview`` of one part (``fmt``: "q" int64 words, "B" bytes): an item
        read or written through it is a Python operation, no NumPy call."""
        start = part.ctypes.data - self.memory.ctypes.data
        return memoryview(self.memory)[start : start + part.nbytes].cast(fmt)


FLOAT32 = np.dtype(np.float32)


def _bytes_of(a: np.ndarray) -> memoryview:
    """``a``'s float32 bytes, as a flat view (a copy only where ``a`` is not C-contiguous float32)."""
    if a.dtype is not FLOAT32:
        a = a.astype(np.float32)
    try:
        return a.data.cast("B")
    except TypeError:  # not C-contiguous
        return np.ascontiguousarray(a).data.cast("B")


def _shared_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class ProcessPlanner:
    """The compute thread's side: ``start`` / ``router`` / ``used`` / ``reset`` events, the
    current estimate (``t``, ``plan``), and the child's lifecycle."""

    def __init__(self, spec: PlannerSpec, ready_timeout_s: float = 60.0):
        self.spec = spec
        self.dir = Path(tempfile.mkdtemp(prefix="expertmap-planner-", dir=_shared_dir()))
        self.layout = Layout(self.dir / "ring", spec, create=True)
        self._ctrl = self.layout.words(self.layout.ctrl, "q")
        self._head = self.layout.words(self.layout.head, "q")
        self._ring = self.layout.words(self.layout.payload, "B")
        self._ring_bytes = len(self._ring)
        self._cursor = 0  # byte offset of the next payload in the ring
        self.written = 0  # events handed to the child
        self.dropped = 0  # events not handed: the ring was full
        self._index_gen = 0  # newest store snapshot file written (ship_index)
        self._lock = threading.Lock()
        self._max_rows = spec.max_rows
        self._derives = frozenset(l for l, r in spec.routers.items() if r.top_k is not None)  # layers
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "expertmap.predictor.planner_child", str(self.dir)], stdin=subprocess.PIPE,
        )  # fmt: skip
        blob = pickle.dumps(spec)
        self._proc.stdin.write(struct.pack("<Q", len(blob)) + blob)
        self._proc.stdin.flush()
        self._fd = self._proc.stdin.fileno()
        deadline = time.monotonic() + ready_timeout_s
        while self.layout.ctrl[READY] == 0:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise PlannerProcessError(f"the planner process did not start (exit code {self._proc.returncode})")
            time.sleep(0.005)
        os.set_blocking(self._fd, False)

    # --- events (compute thread) ----------------------------------------------------------------
    def _slot(self) -> int | None:
        if self.written - self._ctrl[DONE] >= SLOTS:
            self.dropped += 1
            return None
        return self.written % SLOTS

    def _reserve(self, nbytes: int) -> int:
        """Where the next payload of ``nbytes`` goes in the ring (bytes): after the last one, or
        at the start where it would pass the end. The ring holds ``SLOTS`` of the largest, so no
        event the child has not applied is overwritten."""
        at = self._cursor
        if at + nbytes > self._ring_bytes:
            at = 0
        self._cursor = at + ((nbytes + ALIGN - 1) & -ALIGN)
        return at

    def _head_of(self, slot: int, kind: int, a: int, b: int, c: int, at: int) -> None:
        h, head = HEAD * slot, self._head
        head[h] = kind
        head[h + 1] = a
        head[h + 2] = b
        head[h + 3] = c
        head[h + OFFSET] = at >> 2

    def _send(self) -> None:
        self.written += 1
        if self.spec.ordered_stores:
            self._ctrl[WRITTEN] = self.written
            if not self._ctrl[SLEEPING]:
                return  # it is polling: no wake-up, no system call (a missed wake waits for the next event)
        try:
            os.write(self._fd, b"\x01")
        except (BlockingIOError, BrokenPipeError, ValueError):  # full (cannot happen before the ring
            # fills: the pipe holds 64 KiB), or the child is gone (``error`` says so)
            if not self.spec.ordered_stores:
                self.written -= 1  # a byte per event: this one was not handed over
                self.dropped += 1

    def _wake(self) -> None:
        try:
            os.write(self._fd, b"\x01")
        except (BlockingIOError, BrokenPipeError, ValueError):
            pass

    def start(self, iteration: int, embedding: np.ndarray | None, tokens: int) -> None:
        i = self._slot()
        if i is None:
            return
        at = 0
        if embedding is not None:
            data = _bytes_of(embedding)
            at = self._reserve(len(data))
            self._ring[at : at + len(data)] = data
        self._head_of(i, START, iteration, tokens, (self._index_gen << 1) | int(embedding is not None), at)
        self._send()

    def router(self, layer: int, distribution: np.ndarray | None, rows: np.ndarray | None) -> bool:
        """Layer ``layer``'s router ran on ``rows`` [T, H] (its input; None: not known). Its mean
        distribution [J] is sent where given, else the child computes it from the rows with the
        layer's router (``spec.routers``), as it does the next layer's gate and, where the router's
        top-k is the model's choice and every row fits, the layer's chosen experts. True when the
        child derives those (no ``used`` event is needed for this layer)."""
        i = self._slot()
        if i is None:
            return False
        n, derives = 0, False
        if rows is not None and len(rows):
            n = len(rows)
            if n > self._max_rows:
                n, rows = self._max_rows, rows[-self._max_rows :]
            else:
                derives = layer in self._derives
            rows = _bytes_of(rows)
        dist = None if distribution is None else _bytes_of(distribution)
        size = (0 if dist is None else len(dist)) + (len(rows) if n else 0)
        at = end = self._reserve(size)
        if dist is not None:
            end = at + len(dist)
            self._ring[at:end] = dist
        if n:
            self._ring[end : end + len(rows)] = rows
        self._head_of(i, ROUTER, layer, n, int(dist is not None) | (int(derives) << 1), at)
        self._send()
        return derives

    def used(self, layer: int, experts) -> None:
        i = self._slot()
        if i is None:
            return
        data = _bytes_of(np.asarray(list(experts), np.float32))
        at = self._reserve(len(data))
        self._ring[at : at + len(data)] = data
        self._head_of(i, USED, layer, len(data) // 4, 0, at)
        self._send()

    def reset(self) -> None:
        i = self._slot()
        if i is not None:
            self._head_of(i, RESET, 0, 0, 0, 0)
            self._send()

    def ship_index(self, embeddings: np.ndarray, maps: np.ndarray) -> None:
        """A new store snapshot for the child (any thread): the next ``start`` names it."""
        with self._lock:
            gen = self._index_gen + 1
            tmp = self.dir / f"index-{gen}.tmp"
            with open(tmp, "wb") as f:  # two .npy records, no zip: a memory copy into /dev/shm
                np.save(f, np.ascontiguousarray(embeddings, np.float32))
                np.save(f, np.ascontiguousarray(maps, np.float32))
            tmp.rename(self.dir / f"index-{gen}.npy")
            self._index_gen = gen

    # --- the estimate (any thread) --------------------------------------------------------------
    @property
    def t(self) -> np.ndarray:
        """[L, J] expected layers to next use, the newest the child wrote."""
        return self.layout.t[self._ctrl[CURRENT]]

    @property
    def plans(self) -> int:
        """How many plans the child has written (a new one: the plan changed)."""
        return self._ctrl[PLANS]

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(flat keys [S], expected layers to use [S]), soonest first: the newest plan."""
        b = self.layout.ctrl[CURRENT]
        n = int(self.layout.count[b])
        return self.layout.keys[b, :n].copy(), self.layout.key_t[b, :n].copy()

    @property
    def busy_s(self) -> float:
        """The child's CPU seconds so far (work that is not this interpreter's)."""
        return float(self.layout.fctrl[BUSY])

    @property
    def skipped_plans(self) -> int:
        return int(self.layout.ctrl[SKIPPED])

    @property
    def error(self) -> str | None:
        if self._proc.poll() is not None:
            return f"the planner process exited with code {self._proc.returncode}"
        if self.layout.ctrl[ERRORS]:
            return f"the planner process failed on {int(self.layout.ctrl[ERRORS])} events (its stderr says how)"
        return None

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until the child has applied every event handed to it and planned."""
        deadline = time.monotonic() + timeout
        while int(self.layout.ctrl[IDLE_AT]) < self.written:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                return False
            if self.spec.ordered_stores and self.layout.ctrl[SLEEPING]:
                self._wake()  # a wake-up the last event missed
            time.sleep(0.0005)
        return True

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        for path in self.dir.glob("*"):
            path.unlink(missing_ok=True)
        self.dir.rmdir()
