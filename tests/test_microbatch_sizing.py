"""Micro-batch sizing from measured stage times: the fit, and the choice between pipeline fill
and expert sharing."""

from __future__ import annotations

import pytest

from expertmap.cluster.microbatch_sizing import MicroBatchSizer, SizeTimes


def feed(sizer: MicroBatchSizer, a: float, c: float, turnaround: float, sizes=(1, 2, 4, 8, 16)) -> None:
    """Micro-batches whose every stage took a + c b seconds, each back ``turnaround`` after that."""
    for b in sizes:
        stage_s = [a + c * b] * sizer.stages
        sizer.observe(b, stage_s, sum(stage_s) + turnaround)


def test_the_fit_recovers_fixed_and_per_request_costs():
    fit = SizeTimes()
    for b in (1, 3, 5, 9, 2, 3, 3, 3):
        fit.add(b, 0.010 + 0.002 * b)
    a, c = fit.coefficients()
    assert a == pytest.approx(0.010) and c == pytest.approx(0.002)


def test_one_size_seen_is_not_a_fit():
    fit = SizeTimes()
    for _ in range(5):
        fit.add(4, 0.02)
    assert not fit.ready


def test_a_size_seen_long_ago_still_anchors_the_slope():
    fit = SizeTimes()
    fit.add(2, 0.014)
    for _ in range(1000):  # a closed loop: one size from then on
        fit.add(16, 0.042)
    a, c = fit.coefficients()
    assert fit.ready and a == pytest.approx(0.010) and c == pytest.approx(0.002)


def test_until_measured_it_keeps_n_plus_one_in_flight():
    sizer = MicroBatchSizer(stages=3, max_batch=32)
    assert sizer.plan(16) == (4, 4)
    feed(sizer, 0.01, 0.001, 0.002, sizes=(4, 4, 4))  # one size: the slope is unknown
    assert sizer.plan(16) == (4, 2)  # so the next micro-batch tries another
    feed(sizer, 0.01, 0.001, 0.002, sizes=(2,))
    assert sizer.measured and sizer.plan(16) != (4, 2)


def test_one_stage_with_a_fixed_cost_above_the_turnaround_takes_everyone_in_one_micro_batch():
    sizer = MicroBatchSizer(stages=1, max_batch=32)
    feed(sizer, a=0.008, c=0.002, turnaround=0.001)  # the measured instant-link figures, roughly
    assert sizer.plan(16) == (1, 16)
    assert sizer.plan(40) == (1, 32)  # max_batch caps a micro-batch; the other 8 wait one round


def test_one_stage_with_a_slow_turnaround_keeps_a_second_micro_batch_in_flight():
    sizer = MicroBatchSizer(stages=1, max_batch=32)
    feed(sizer, a=0.002, c=0.002, turnaround=0.030)  # the stage would idle 30 ms per round otherwise
    depth, size = sizer.plan(16)
    assert depth > 1 and depth * size >= 16
    assert depth * (0.002 + 0.002 * size) >= 0.9 * (0.002 + 0.002 * size + 0.030)  # the stage hides the turnaround


def test_six_stages_fill_the_pipeline_and_no_more():
    sizer = MicroBatchSizer(stages=6, max_batch=32)
    feed(sizer, a=0.0015, c=0.0004, turnaround=0.004)
    depth, size = sizer.plan(16)
    assert depth >= 6 and size * depth >= 16  # at least one micro-batch per stage
    assert sizer.round_time(1, 16) > 2 * sizer.round_time(depth, size)  # one would leave five stages idle


def test_a_fixed_depth_is_kept_and_a_bad_one_refused():
    sizer = MicroBatchSizer(stages=2, max_batch=8, fixed_depth=5)
    feed(sizer, 0.01, 0.001, 0.001)
    assert sizer.plan(20) == (5, 4)
    with pytest.raises(ValueError, match="micro-batches in flight = 0"):
        MicroBatchSizer(stages=2, max_batch=8, fixed_depth=0)


def test_observations_that_missed_a_stage_are_ignored():
    sizer = MicroBatchSizer(stages=2, max_batch=8)
    sizer.observe(4, [0.01], 0.02)  # one stage's time only
    sizer.observe(0, [0.01, 0.01], 0.03)  # a release-only batch
    assert all(not f.means for f in sizer.fits) and sizer.turnarounds == []
