"""The scheduler's watchdog: a micro-batch stuck in the pipeline is reported and its requests are
re-run (no token yet) or failed with a clear error, never left waiting. Real Ray actors stand in
for the stages: one of them holds a chosen call far past the deadline."""

from __future__ import annotations

import os
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest
import ray

from expertmap.actors.sampling import SamplingParams
from expertmap.cluster.pipeline import PipelineRequest, PipelineStallError, Scheduler, stall_deadline

pytestmark = pytest.mark.timeout(180)


@ray.remote(num_cpus=0, max_concurrency=4)
class StuckOnce:
    """A one-stage pipeline that answers token 7, except that its ``stuck_call``-th forward
    (counting from 1) sleeps ``hold_s`` first."""

    def __init__(self, stuck_call: int, hold_s: float):
        self.calls = 0
        self.stuck_call, self.hold_s = stuck_call, hold_s

    def forward(self, mb):
        self.calls += 1
        if self.calls == self.stuck_call:
            time.sleep(self.hold_s)
        for step in mb.steps:
            step.token = 7
        return mb

    def stats(self):
        return {"steps": self.calls, "busy_s": 0.0, "stall_s": 0.0, "requests": 0}


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def run_one(stage, params: SamplingParams) -> tuple[PipelineRequest, Scheduler]:
    ray.get(stage.stats.remote(), timeout=60)  # started: the deadline measures the call, not the start-up
    scheduler = Scheduler([stage], max_batch=2, stall_deadline_s=3.0)
    req = scheduler.submit(PipelineRequest("r0", [1, 2, 3], params, eos_ids=set()))
    req.done.wait(timeout=60)
    scheduler.close()
    return req, scheduler


def test_a_stuck_prefill_is_run_again(ray_local, caplog):
    req, scheduler = run_one(StuckOnce.remote(stuck_call=1, hold_s=15.0), SamplingParams(max_new_tokens=3))
    assert req.done.is_set() and req.error is None
    assert req.tokens == [7, 7, 7] and req.attempt == 1  # the second attempt finished the request
    assert scheduler.stalls == 1
    assert any("in flight for" in r.getMessage() and "r0" in r.getMessage() for r in caplog.records)


def test_a_request_stuck_after_its_first_token_fails_clearly(ray_local):
    req, scheduler = run_one(StuckOnce.remote(stuck_call=2, hold_s=15.0), SamplingParams(max_new_tokens=3))
    assert req.done.is_set() and isinstance(req.error, PipelineStallError)
    assert "after 1 tokens; retry the request" in str(req.error)
    assert scheduler.stalls == 1


def test_the_deadline_follows_the_link_and_layer_times():
    assert stall_deadline(8, 2, 8, None, None) == 30.0  # real copies: the floor
    assert stall_deadline(8, 2, 8, 1e-3, 13.0) == pytest.approx(20 * 8 * 1e-3 * (8 + 8 * 2 * 13.0))
    assert stall_deadline(8, 2, 1, 1e-5, 1.0) == 30.0
