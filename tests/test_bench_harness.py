"""The benchmark harness's own arithmetic and rendering (bench/): no timing, no mounts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import bench.report
    import bench.selfcheck
    import bench.stats

    return bench


def test_self_check_passes_and_prints_a_table():
    done = run_bench("--only-harness")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "harness self-check ok" in done.stdout
    assert "ratio to best" in done.stdout


def test_self_check_expectations_hold(bench):
    assert bench.selfcheck.check() == []


def test_ratio_direction_follows_the_unit(bench):
    stats, report = bench.stats, bench.report
    # Time: half the best peer's time is a 0.5x ratio and meets "ahead of best".
    row = report.Row(
        "t",
        "t",
        stats.SECONDS,
        report.Result("ours", [1.0, 1.0, 1.0]),
        [report.Result("a", [2.0, 2.0, 2.0]), report.Result("b", [3.0, 3.0, 3.0])],
        stats.ahead_of_best(stats.SECONDS),
    )
    assert row.best_peer().subject == "a"
    assert row.ratio() == pytest.approx(0.5)
    assert row.met() is True
    # Throughput: the best peer is the fastest one, and being slower misses.
    row = report.Row(
        "r",
        "r",
        stats.THROUGHPUT,
        report.Result("ours", [100.0, 100.0, 100.0]),
        [report.Result("a", [200.0] * 3), report.Result("b", [400.0] * 3)],
        stats.ahead_of_best(stats.THROUGHPUT),
    )
    assert row.best_peer().subject == "b"
    assert stats.format_ratio(row.ratio()) == "0.25x"
    assert row.met() is False


def test_median_of_repetitions_not_mean(bench):
    result = bench.report.Result("ours", [1.0, 100.0, 2.0])
    assert result.value == 2.0


def test_missing_peer_is_reported_not_fatal(bench):
    report = bench.report
    row = report.Row(
        "x",
        "x",
        bench.stats.SECONDS,
        report.Result("ours", [1.0] * 3),
        [report.Result("peer", error="unavailable: peer not installed")],
        bench.stats.Target("ratio_max", 1.0),
    )
    assert row.ratio() is None and row.met() is None
    assert not row.ours_failed()
    suite = report.SuiteReport("s", "S", [row])
    assert "x — peer: unavailable: peer not installed" in report.render_markdown(suite)


@pytest.mark.parametrize("args", [["--reps", "2"], ["nosuchsuite"], ["--size", "lots"]])
def test_bad_arguments_are_usage_errors(args):
    done = run_bench(*args)
    assert done.returncode == 2
    assert "usage:" in done.stderr


def test_target_against_a_named_peer(bench):
    stats, report = bench.stats, bench.report
    target = stats.Target("ratio_max", 2.0, stats.MEGABYTES, versus="securefs")
    # The named peer, not the best one: 60 MB is 1.5x securefs' 40 MB (the best has 30).
    row = report.Row(
        "m",
        "m",
        stats.MEGABYTES,
        report.Result("ours", [60.0]),
        [report.Result("gocryptfs", [30.0]), report.Result("securefs", [40.0])],
        target,
    )
    assert row.ratio() == pytest.approx(1.5)
    assert row.met() is True
    assert target.describe() == "≤ 2.00x securefs"
    assert report.SuiteReport("s", "S", [row]).grid()[1][4] == "1.50x securefs"
    # The better peer the target does not name is still shown, as a note.
    assert report.SuiteReport("s", "S", [row]).row_notes() == [
        "m: against the best peer (gocryptfs, not judged): 2.00x"
    ]
    row.ours.samples = [81.0]
    assert row.met() is False
    # Without the named peer's number there is nothing to judge, even with another peer.
    row.peers[1] = report.Result("securefs", error="failed: boom")
    assert row.ratio() is None and row.met() is None
