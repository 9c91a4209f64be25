"""Run a policy's search and planning off the critical path: one thread, a bounded queue.

The compute thread only enqueues (cheap); the worker applies every item in order and runs the
expensive planning step only for the newest item: when more work is already waiting, planning
for an older position is stale and is skipped. If the queue is full the item is dropped and
counted, and the consumer is told (``on_drop``) so it can stop trusting its incremental state.
``synchronous=True`` runs everything inline (the trace-driven simulator, tests).
"""

from __future__ import annotations

import logging
import queue
import threading
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
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._idle = threading.Event()
        self._idle.set()
        self._thread = None
        if not synchronous:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def submit(self, item: Any) -> None:
        if self.synchronous:
            self.apply(item)
            self.plan()
            return
        try:
            self._idle.clear()
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop(item)

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty and the last item is processed (tests, end of run)."""
        return self.synchronous or self._idle.wait(timeout)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.apply(item)
                if self._queue.empty():
                    self.plan()
                else:
                    self.skipped_plans += 1
            except BaseException as exc:  # a planner bug must not take serving down: log, keep going
                self.error = exc
                logger.exception("background planner failed on %r", item)
            finally:
                if self._queue.empty():
                    self._idle.set()
