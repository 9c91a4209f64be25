"""Run a policy's search and planning off the critical path: one thread, a bounded queue.

The compute thread only enqueues (cheap); the worker applies every item in order and runs the
expensive planning step only for the newest item: when more work is already waiting, planning
for an older position is stale and is skipped. An item submitted with ``replan=False`` only
updates state (the next planning item plans with it). If the queue is full the item is dropped and
counted, and the consumer is told (``on_drop``) so it can stop trusting its incremental state.
``synchronous=True`` runs everything inline (the trace-driven simulator, tests). The thread starts
with the first item, so a policy that never submits (hybrid planning in a process) has none.

``busy_s`` is the worker's CPU time in ``apply`` and ``plan`` (not its waits for the
interpreter). Python runs one thread at a time (the GIL), so where the compute thread is
Python-bound this work is not free: the compute thread waits for it whenever it wants the
interpreter back (measured on the bundled model, bench/results/prediction_cost: the worker made
iterations no faster than running it inline).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class BackgroundPlanner:
    def __init__(
        self,
        apply: Callable[[Any], None],
        plan: Callable[[], None],
        on_drop: Callable[[Any], None] | None = None,
        maxsize: int = 64,
        synchronous: bool = False,
        name: str = "planner",
    ):
        self.apply = apply
        self.plan = plan
        self.on_drop = on_drop
        self.synchronous = synchronous
        self.dropped = 0
        self.skipped_plans = 0
        self.busy_s = 0.0  # the worker's CPU time in apply and plan (inline work is the caller's)
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._idle = threading.Event()
        self._idle.set()
        self._name = name
        self._thread: threading.Thread | None = None
        self._closed = False
        self._start_lock = threading.Lock()

    def submit(self, item: Any, replan: bool = True) -> None:
        if self.synchronous:
            self.apply(item)
            if replan:
                self.plan()
            return
        if (self._thread is None or self._closed) and not self._start():
            self._drop(item)
            return
        try:
            self._idle.clear()
            self._queue.put_nowait((item, replan))
        except queue.Full:
            self._drop(item)

    def _start(self) -> bool:
        """Start the worker (first submit); False once closed: nothing runs the item."""
        with self._start_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            return self._thread is not None and not self._closed

    def _drop(self, item: Any) -> None:
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(item)

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty and the last item is processed (tests, end of run)."""
        return self.synchronous or self._idle.wait(timeout)

    def close(self) -> None:
        with self._start_lock:
            self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        owed = False  # a planning item was applied and its plan skipped (newer work was waiting)
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            item, replan = entry
            t0 = time.thread_time()
            try:
                self.apply(item)
                owed = owed or replan
                if owed and self._queue.empty():
                    owed = False
                    self.plan()
                elif owed:
                    self.skipped_plans += 1
            except BaseException as exc:  # a planner bug must not take serving down: log, keep going
                self.error = exc
                logger.exception("background planner failed on %r", item)
            finally:
                self.busy_s += time.thread_time() - t0
                if self._queue.empty():
                    self._idle.set()
