"""The benchmark harness: timing, interleaved comparison, report schema, discovery, mean ± std."""

from __future__ import annotations

import gc
import inspect
import json
import math
import sys
import time
import types

import pytest

import benchmarks.__main__ as runner
from benchmarks.harness import (
    BenchmarkReport,
    TimingResult,
    compare,
    discover_benchmarks,
    machine_info,
    mean_std,
    time_callable,
    torch_threads,
)

MS = 1e-3


class FakeClock:
    """A clock for the harness's ``clock=`` that moves only when told to (no sleeping, no load).

    Starts far from zero, so a sample that returned an absolute reading instead of a difference
    would show.
    """

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_time_callable_times_the_calls_only_and_drops_the_warmup():
    clock = FakeClock()
    events = []
    # the warm-up sample is far longer than the rest: keeping it would show in the samples
    durations = iter([9.0, 4 * MS, 1 * MS, 7 * MS, 3 * MS, 2 * MS, 6 * MS, 5 * MS])

    def setup():
        events.append("setup")
        clock.advance(100.0)  # would swamp every sample if it were timed

    def fn():
        events.append(("fn", gc.isenabled()))
        clock.advance(next(durations))

    gc_was_enabled = gc.isenabled()
    result = time_callable(fn, warmup=1, repeats=7, setup=setup, clock=clock)
    assert result.number == 1
    assert result.samples == pytest.approx([4 * MS, 1 * MS, 7 * MS, 3 * MS, 2 * MS, 6 * MS, 5 * MS])
    # setup runs before every sample, warm-up included; the collector is paused while timing
    assert events == ["setup", ("fn", False)] * 8
    assert gc.isenabled() == gc_was_enabled
    assert result.median == pytest.approx(4 * MS)
    assert result.q1 == pytest.approx(2.5 * MS) and result.q3 == pytest.approx(5.5 * MS)
    assert result.iqr == pytest.approx(3 * MS)
    assert result.min == pytest.approx(1 * MS)
    assert result.min <= result.q1 <= result.median <= result.q3


def test_time_callable_divides_by_number_of_calls():
    clock = FakeClock()
    # sample i: four calls of (1, 2, 3, 6) ms times (i + 1), i.e. 12 (i + 1) ms, 3 (i + 1) per call
    durations = iter([c * k * MS for k in (1, 2, 3) for c in (1, 2, 3, 6)])
    calls = []

    def fn():
        calls.append(1)
        clock.advance(next(durations))

    result = time_callable(fn, warmup=0, repeats=3, number=4, clock=clock)
    assert result.number == 4
    assert len(calls) == 12
    assert result.samples == pytest.approx([3 * MS, 6 * MS, 9 * MS])


def test_the_default_clock_is_perf_counter_and_times_real_calls():
    for timer in (time_callable, compare):
        assert inspect.signature(timer).parameters["clock"].default is time.perf_counter
    calls = []
    result = time_callable(lambda: calls.append(1), warmup=1, repeats=2, number=3)
    assert len(calls) == 9 and len(result.samples) == 2  # no assertion on how long it took


def test_timing_result_summaries_against_hand_computed_values():
    result = TimingResult((0.004, 0.001, 0.003, 0.002, 0.005))
    assert result.median == pytest.approx(0.003)
    assert result.q1 == pytest.approx(0.002) and result.q3 == pytest.approx(0.004)
    assert result.metrics(prefix="step_") == pytest.approx(
        {"step_median_ms": 3.0, "step_iqr_ms": 2.0, "step_min_ms": 1.0}
    )


def test_compare_interleaves_and_its_rotation_cancels_a_linear_drift():
    clock = FakeClock()
    order = []

    def timed(name, cost):
        def run():
            order.append(name)
            # the machine slows down call after call: the n-th call costs `cost * n` ms
            clock.advance(cost * len(order) * MS)

        return run

    result = compare(timed("fast", 1), {"slow": timed("slow", 2)}, warmup=1, repeats=6, clock=clock)
    assert set(result) == {"baseline", "candidates", "ratios"}
    assert list(result["candidates"]) == list(result["ratios"]) == ["slow"]
    # round-robin, the order rotated every round: fast slow | slow fast | fast slow | ...
    assert order == ["fast", "slow", "slow", "fast"] * 3 + ["fast", "slow"]
    # round 0 (calls 1, 2) is the warm-up; fast ran as calls 4 5 8 9 12 13, slow as 3 6 7 10 11 14
    fast, slow = result["baseline"], result["candidates"]["slow"]
    assert fast.number == slow.number == 1
    assert fast.samples == pytest.approx([n * MS for n in (4, 5, 8, 9, 12, 13)])
    assert slow.samples == pytest.approx([2 * n * MS for n in (3, 6, 7, 10, 11, 14)])
    # both medians are at call 8.5: the drift cancels and the ratio is exactly the cost ratio
    # (timing fast first in every round would give 18 / 8 = 2.25)
    assert result["ratios"]["slow"] == pytest.approx(2.0)


def test_compare_runs_setup_untimed_before_every_sample_and_divides_by_number():
    clock = FakeClock()
    events = []

    def setup():
        events.append("setup")
        clock.advance(100.0)

    def timed(name, cost):
        def run():
            events.append(name)
            clock.advance(cost * MS)

        return run

    result = compare(
        timed("a", 1.0),
        {"b": timed("b", 3.0), "c": timed("c", 0.5)},
        warmup=2,
        repeats=3,
        number=2,
        setup=setup,
        clock=clock,
    )
    rounds = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"], ["b", "c", "a"]]
    assert events == [event for keys in rounds for k in keys for event in ("setup", k, k)]
    assert result["baseline"].samples == pytest.approx([1 * MS] * 3)
    assert result["candidates"]["b"].samples == pytest.approx([3 * MS] * 3)
    assert result["candidates"]["c"].samples == pytest.approx([0.5 * MS] * 3)
    assert result["baseline"].number == result["candidates"]["c"].number == 2
    assert result["ratios"] == pytest.approx({"b": 3.0, "c": 0.5})


def test_compare_refuses_no_candidates_and_bad_counts():
    with pytest.raises(ValueError, match="candidates"):
        compare(lambda: None, {})
    with pytest.raises(ValueError, match="repeats"):
        time_callable(lambda: None, repeats=0)


def test_mean_std_against_hand_computed_values():
    # mean 5; squared deviations 9+1+1+9 = 20; sample variance 20/3
    mean, std = mean_std([2.0, 4.0, 6.0, 8.0])
    assert mean == pytest.approx(5.0)
    assert std == pytest.approx(math.sqrt(20 / 3))
    assert mean_std([3.5]) == (3.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_report_json_has_exactly_the_schema_keys(tmp_path):
    report = BenchmarkReport(
        name="toy",
        metrics={"base": {"t_ms": 1.0}, "method": {"t_ms": 2.0, "acc": [0.5, 0.7]}},
        ratios={"method/base": 2.0},
    )
    path = report.write(tmp_path)
    assert path == tmp_path / "toy.json"
    document = json.loads(path.read_text())
    assert set(document) == {"machine", "metrics", "ratios"}
    assert document["metrics"]["method"]["acc"] == [0.5, 0.7]
    assert document["ratios"] == {"method/base": 2.0}
    assert set(document["machine"]) >= {
        "platform",
        "processor",
        "python",
        "torch",
        "cpu_count",
        "torch_threads",
        "cuda_device",
    }

    report.config, report.notes = {"seed": 0}, "read me"
    document = json.loads(report.write(tmp_path).read_text())
    assert set(document) == {"machine", "metrics", "ratios", "config", "notes"}


def test_table_shows_mean_and_std_of_per_seed_values():
    report = BenchmarkReport(
        name="toy",
        metrics={"base": {"acc": 0.25}, "method": {"acc": [2.0, 4.0, 6.0, 8.0]}},
        ratios={"method/base": 1.5},
        machine={},
    )
    table = report.format_table()
    lines = table.splitlines()
    assert lines[1].split() == ["method", "acc"]
    assert lines[3].split() == ["base", "0.25"]
    assert f"5 ± {math.sqrt(20 / 3):.2g} (n=4)" in lines[4]
    assert lines[-1] == "ratio method/base: 1.500"


def test_machine_info_names_the_machine():
    info = machine_info()
    assert info["cpu_count"] >= 1 and info["torch_threads"] >= 1
    assert info["torch"].startswith("2.")


def test_discovery_finds_modules_with_main_only(tmp_path):
    assert "trainer_overhead" in discover_benchmarks()
    assert {"harness", "__main__"}.isdisjoint(discover_benchmarks())
    (tmp_path / "with_main.py").write_text("def main(argv=None):\n    return None\n")
    (tmp_path / "helper.py").write_text("def helper():\n    return None\n")
    (tmp_path / "harness.py").write_text("def main(argv=None):\n    return None\n")
    assert discover_benchmarks(tmp_path) == ["with_main"]


def test_runner_lists_and_refuses_unknown_names(capsys):
    assert runner.main(["--list"]) == 0
    assert "trainer_overhead" in capsys.readouterr().out.split()
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["no_such_benchmark"])
    assert exit_info.value.code == 2


def test_runner_reports_a_failure_runs_the_rest_and_exits_non_zero(monkeypatch, capsys):
    def broken_main(argv=None):
        raise RuntimeError("boom")

    good_report = BenchmarkReport(name="good", metrics={}, ratios={"a/b": 2.0}, machine={})
    fakes = {"broken": broken_main, "good": lambda argv=None: good_report}
    for name, fake_main in fakes.items():
        monkeypatch.setitem(
            sys.modules, f"benchmarks.{name}", types.SimpleNamespace(main=fake_main)
        )
    monkeypatch.setattr(runner, "discover_benchmarks", lambda: ["broken", "good"])
    assert runner.main([]) == 1
    output = capsys.readouterr()
    assert "RuntimeError: boom" in output.err
    summary = output.out.split("== summary ==")[1].splitlines()
    assert summary[1].split()[:2] == ["broken", "FAILED"]
    assert summary[2].split()[:2] == ["good", "ok"] and summary[2].endswith("a/b=2.000")
    assert runner.main(["good"]) == 0


def test_trainer_step_fn_matches_a_plain_sgd_loop(tmp_path):
    """Driving a stock Trainer one step at a time does the plain loop's arithmetic, bit for bit."""
    from benchmarks.trainer_overhead import sgd_losses

    plain_loss, trainer_loss = sgd_losses(seed=0, steps=3, lr=0.1, output_dir=str(tmp_path))
    assert math.isfinite(plain_loss)
    assert trainer_loss == plain_loss


def test_torch_threads_sets_and_restores_even_on_error():
    import torch

    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    with torch_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(target):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before
