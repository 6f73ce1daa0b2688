"""The speed criterion's paired timing (kdcache.evaluation.speed): calls alternate, each round's ratio cancels a load shared by
its two calls, and the interval is the bootstrap's. A simulated clock stands in for the machine's load; one run on
tiny models goes through the real loading and inference."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.evaluation.speed import paired_speedup, time_interleaved


class LoadedClock:
    """A clock whose calls cost ``cost * load(now)`` seconds: the load ramps from 1 to ``peak`` over ``span``
    seconds, as when other jobs start on the machine mid-measurement."""

    def __init__(self, peak: float, span: float):
        self.now, self.peak, self.span, self.order = 0.0, peak, span, []

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, cost: float):
        def run(i: int) -> None:
            self.order.append((name, i))
            self.now += cost * (1 + (self.peak - 1) * min(self.now / self.span, 1.0))
        return run


def test_a_load_shared_by_each_pair_cancels_out():
    drift = np.random.default_rng(0).uniform(1, 20, size=40)  # [40] the load of each round
    out = paired_speedup(3.0 * drift, 1.0 * drift, seed=0)
    assert out["ratio"] == pytest.approx(3.0) and out["ci"] == pytest.approx([3.0, 3.0]) and out["pairs"] == 40


def test_the_interval_covers_the_ratio_and_narrows_with_more_pairs():
    rng = np.random.default_rng(1)
    few = paired_speedup(3.0 * rng.lognormal(0, 0.3, 10), rng.lognormal(0, 0.3, 10))
    many = paired_speedup(3.0 * rng.lognormal(0, 0.3, 400), rng.lognormal(0, 0.3, 400))
    for out in (few, many):
        assert out["ci"][0] <= out["ratio"] <= out["ci"][1]
    assert many["ci"][0] <= 3.0 <= many["ci"][1]
    assert many["ci"][1] - many["ci"][0] < few["ci"][1] - few["ci"][0]


def test_unpaired_timings_are_refused():
    with pytest.raises(ValueError, match="equal"):
        paired_speedup([1.0, 2.0], [1.0])


def test_interleaved_calls_alternate_and_recover_the_ratio_under_a_rising_load():
    # the teacher costs 3 units, the student 1; the load rises tenfold during the measurement
    clock = LoadedClock(peak=10.0, span=600.0)
    times = time_interleaved([clock.call("teacher", 3.0), clock.call("student", 1.0)], runs=50, warmup=2, clock=clock)
    assert times.shape == (50, 2)
    assert clock.order[:6] == [("teacher", 0), ("student", 0), ("student", 1), ("teacher", 1), ("teacher", 2), ("student", 2)]
    assert paired_speedup(times[:, 0], times[:, 1])["ratio"] == pytest.approx(3.0, rel=0.1)

    # timed one model after the other, as the report did before: the student runs under the higher load
    clock = LoadedClock(peak=10.0, span=600.0)
    teacher = time_interleaved([clock.call("teacher", 3.0)], runs=50, warmup=2, clock=clock)[:, 0]
    student = time_interleaved([clock.call("student", 1.0)], runs=50, warmup=2, clock=clock)[:, 0]
    assert np.median(teacher) / np.median(student) < 1.5  # the criterion would fail a student 3x faster


def test_paired_latency_of_tiny_models(trained_teacher, tiny_student, small_data, one_thread):
    from kdcache import data as kdata
    from kdcache.config import FineTuneConfig
    from kdcache.evaluation.measure import measure_paired_latency
    from kdcache.tasks import get_task

    config = FineTuneConfig(model_name=str(tiny_student), task_type="text_classification", max_length=48,
                            train_file=str(small_data["train"]), eval_file=str(small_data["eval"]))
    task = get_task(config.task_type)
    labels = task.label_info(kdata.require_train(None, config), config)
    examples = kdata.with_example_ids(kdata.load_split(config, "eval"))
    out = measure_paired_latency(str(trained_teacher), str(tiny_student), config, examples, labels, runs=8, warmup=1)
    for side in ("teacher", "student"):
        assert out[side]["runs"] == 8 and 0 < out[side]["median_ms"] <= out[side]["p90_ms"]
    speed = out["speedup"]
    assert speed["pairs"] == 8 and speed["ci"][0] <= speed["ratio"] <= speed["ci"][1]
