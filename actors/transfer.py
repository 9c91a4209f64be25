"""Transfer engines: how one host->device expert copy is made and timed.

One engine per device; the cache's worker thread calls ``copy`` for one expert at a time, so the
link is serial, as a PCIe link is. ``copy`` returns when the expert is fully resident.

- ``CudaTransfer``: real copies from pinned host memory on a dedicated copy stream; the stream
  first waits for the compute work that last read the slot, then copies, then an event marks
  completion (the worker waits on that event, never the compute thread).
- ``EmulatedLink``: CPU device. Copies the bytes, then holds the link until bytes / bandwidth has
  passed since the copy began, so prefetches overlap compute and misses stall as over PCIe.
- ``InstantLink``: copies with no added delay (tests and calibration only).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod

import torch

from expertmap.actors.slot_pool import SlotPool

logger = logging.getLogger(__name__)


class TransferEngine(ABC):
    def __init__(self, pool: SlotPool):
        self.pool = pool
        self.busy_s = 0.0  # time the link was occupied
        self._bytes_copied = 0
        #: set by the cache while a miss waits for the link: a prefetch's copy may sleep through its
        #: chunk boundaries until it is set (each wake-up of the worker takes the interpreter from
        #: the compute thread)
        self.demand = threading.Event()

    #: a copy is made in this many chunks; between chunks ``between_chunks`` runs (pause on miss)
    chunks = 8

    @abstractmethod
    def copy(self, slot: int, host: dict[str, torch.Tensor], nbytes: int, between_chunks=None) -> None:
        """Copy one expert into ``slot``; return when it is resident."""

    def slot_released(self, slot: int) -> None:
        """Called on the compute thread after the last kernel that reads ``slot`` was issued."""

    def estimate_s(self, nbytes: int) -> float:
        """Seconds one copy of ``nbytes`` holds an idle link (the miss cost model's copy time):
        the copies made so far, bytes / busy time; 0 before the first."""
        return nbytes * self.busy_s / self._bytes_copied if self._bytes_copied else 0.0

    def _count(self, nbytes: int) -> None:
        self._bytes_copied += nbytes


class InstantLink(TransferEngine):
    def copy(self, slot, host, nbytes, between_chunks=None):
        t0 = time.perf_counter()
        self.pool.write(slot, host)
        self.busy_s += time.perf_counter() - t0
        self._count(nbytes)


class EmulatedLink(TransferEngine):
    def __init__(self, pool: SlotPool, bandwidth_bytes_per_s: float):
        super().__init__(pool)
        if bandwidth_bytes_per_s <= 0:
            raise ValueError(f"link bandwidth {bandwidth_bytes_per_s!r} B/s must be positive")
        self.bandwidth = bandwidth_bytes_per_s

    def estimate_s(self, nbytes: int) -> float:
        return nbytes / self.bandwidth

    def copy(self, slot, host, nbytes, between_chunks=None):
        t0 = time.perf_counter()
        self.pool.write(slot, host)  # the bytes; the link is then held for bytes / bandwidth
        total_s = nbytes / self.bandwidth
        chunk_s = total_s / self.chunks
        while True:
            left = t0 + total_s - time.perf_counter()
            if left <= 0:
                break
            waited = between_chunks is not None and self.demand.wait(timeout=left)
            # a miss waits: hold the link to the next chunk boundary (chunks complete there), then
            # let the misses go first; none did, or the boundary is the copy's end: finish it
            done = int((time.perf_counter() - t0) / chunk_s) + 1 if waited else self.chunks
            if done >= self.chunks:
                time.sleep(max(0.0, t0 + total_s - time.perf_counter()))
                break
            time.sleep(max(0.0, t0 + done * chunk_s - time.perf_counter()))
            paused = time.perf_counter()
            between_chunks()
            t0 += time.perf_counter() - paused  # paused time is not this copy's
        self.busy_s += time.perf_counter() - t0
        self._count(nbytes)


class CudaTransfer(TransferEngine):
    """Copy stream + events. Host tensors must be pinned for the copies to be asynchronous. A copy
    is issued a chunk at a time and waits for each; between chunks the waiting misses go first, and
    only while one waits (``demand``) is the cache called there."""

    def __init__(self, pool: SlotPool, device: torch.device):
        super().__init__(pool)
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        # event recorded on the compute stream when a slot's last reader was issued
        self._slot_free: dict[int, torch.cuda.Event] = {}
        self._guess_bytes_per_s = 25e9  # PCIe 4.0 x16 in practice, until copies have been measured

    def estimate_s(self, nbytes):
        return super().estimate_s(nbytes) if self._bytes_copied else nbytes / self._guess_bytes_per_s

    def slot_released(self, slot):
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._slot_free[slot] = ev

    def copy(self, slot, host, nbytes, between_chunks=None):
        t0 = time.perf_counter()
        dst = self.pool.view(slot)
        with torch.cuda.stream(self.stream):
            free = self._slot_free.pop(slot, None)
            if free is not None:
                self.stream.wait_event(free)
        parts = {n: (dst[n].chunk(self.chunks), host[n].chunk(self.chunks)) for n in dst}
        for i in range(self.chunks):
            done = torch.cuda.Event()
            with torch.cuda.stream(self.stream):
                for d_chunks, h_chunks in parts.values():
                    if i < len(d_chunks):
                        d_chunks[i].copy_(h_chunks[i], non_blocking=True)
                done.record(self.stream)
            done.synchronize()  # on the transfer worker thread only
            if between_chunks is not None and i + 1 < self.chunks and self.demand.is_set():
                paused = time.perf_counter()
                between_chunks()
                t0 += time.perf_counter() - paused  # paused time is not this copy's
        self.busy_s += time.perf_counter() - t0
        self._count(nbytes)


def make_transfer(mode: str, pool: SlotPool, device: torch.device, bandwidth: float | None) -> TransferEngine:
    if mode == "cuda":
        if device.type != "cuda":
            raise ValueError(f"link mode 'cuda' needs a CUDA device, got {device}")
        return CudaTransfer(pool, device)
    if mode == "emulated":
        if bandwidth is None:
            raise ValueError("link mode 'emulated' needs a bandwidth (or a copy/layer ratio to derive it)")
        return EmulatedLink(pool, bandwidth)
    if mode == "instant":
        return InstantLink(pool)
    raise ValueError(f"unknown link mode {mode!r}; use cuda, emulated or instant")
