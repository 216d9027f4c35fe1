"""The benchmark harness: timing, interleaved comparison, report schema, discovery, mean ± std."""

from __future__ import annotations

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

SLEEP_S = 0.005


def test_time_callable_measures_a_known_sleep():
    calls = []
    result = time_callable(
        lambda: time.sleep(SLEEP_S), warmup=1, repeats=7, setup=lambda: calls.append(1)
    )
    assert len(result.samples) == 7
    assert len(calls) == 8  # setup runs before every sample, warm-up included
    # sleep never returns early; scheduling can only add time
    assert SLEEP_S <= result.median < SLEEP_S * 2.5
    assert result.min <= result.q1 <= result.median <= result.q3
    assert result.iqr == pytest.approx(result.q3 - result.q1)


def test_time_callable_divides_by_number_of_calls():
    result = time_callable(lambda: time.sleep(SLEEP_S / 4), warmup=0, repeats=3, number=4)
    assert result.number == 4
    assert SLEEP_S / 4 <= result.median < SLEEP_S / 4 * 3


def test_timing_result_summaries_against_hand_computed_values():
    result = TimingResult((0.004, 0.001, 0.003, 0.002, 0.005))
    assert result.median == pytest.approx(0.003)
    assert result.q1 == pytest.approx(0.002) and result.q3 == pytest.approx(0.004)
    assert result.metrics(prefix="step_") == pytest.approx(
        {"step_median_ms": 3.0, "step_iqr_ms": 2.0, "step_min_ms": 1.0}
    )


def test_compare_interleaves_and_finds_a_twice_slower_function():
    order = []

    def fast():
        order.append("fast")
        time.sleep(SLEEP_S)

    def slow():
        order.append("slow")
        time.sleep(2 * SLEEP_S)

    result = compare(fast, {"slow": slow}, warmup=1, repeats=6)
    assert set(result) == {"baseline", "candidates", "ratios"}
    assert len(result["baseline"].samples) == len(result["candidates"]["slow"].samples) == 6
    assert 1.5 < result["ratios"]["slow"] < 3.0
    # round-robin, the order rotated every round: fast slow | slow fast | fast slow | ...
    assert order[:6] == ["fast", "slow", "slow", "fast", "fast", "slow"]
    assert order.count("fast") == order.count("slow") == 7


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
