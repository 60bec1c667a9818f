"""``python -m bench --only-harness``: check the arithmetic and rendering without timing anything.

Made-up results go through the same code as real ones; every check is an
exact expectation about a printed cell or a verdict.
"""

from __future__ import annotations

import math

from bench.report import Result, Row, SuiteReport, render_markdown, render_text
from bench.stats import (
    IOPS,
    MEGABYTES,
    SECONDS,
    THROUGHPUT,
    GiB,
    MiB,
    Target,
    ahead_of_best,
    format_bytes,
    format_ratio,
    format_seconds,
    median,
    parse_size,
    ratio,
    spread,
)


def sample_report() -> SuiteReport:
    """A small report exercising every kind of row and cell."""
    report = SuiteReport("demo", "Demo suite")
    report.rows = [
        Row(
            "demo.time",
            "untar",
            SECONDS,
            Result("occlumfs", [2.0, 1.0, 3.0]),
            [Result("gocryptfs", [4.0, 4.0, 4.0]), Result("securefs", [3.0, 5.0, 4.0])],
            ahead_of_best(SECONDS),
        ),
        Row(
            "demo.tput",
            "seq | read",
            THROUGHPUT,
            Result("occlumfs", [300, 310, 290]),
            [Result("gocryptfs", [600, 650, 610]), Result("securefs", error="unavailable: x")],
            ahead_of_best(THROUGHPUT),
        ),
        Row(
            "demo.rss",
            "rss",
            MEGABYTES,
            Result("occlumfs", [90.4]),
            [Result("gocryptfs", [30.0])],
            Target("value_max", 200, MEGABYTES),
        ),
        Row(
            "demo.fail",
            "fio",
            IOPS,
            Result("occlumfs", error="failed: boom"),
            [Result("gocryptfs", [12000.0])],
            ahead_of_best(IOPS),
        ),
    ]
    return report


def check() -> list[str]:
    """Every failed expectation, as a line; empty when the harness is sound."""
    problems: list[str] = []

    def expect(what: str, got, want) -> None:
        if got != want:
            problems.append(f"{what}: got {got!r}, want {want!r}")

    expect("median odd", median([3.0, 1.0, 2.0]), 2.0)
    expect("median even", median([4.0, 1.0, 2.0, 3.0]), 2.5)
    expect("spread", spread([1.0, 2.0, 3.0]), 1.0)
    expect("spread single", spread([5.0]), 0.0)
    expect("parse 1G", parse_size("1G"), GiB)
    expect("parse 512MiB", parse_size("512MiB"), 512 * MiB)
    expect("parse bytes", parse_size("4096"), 4096)
    expect("format 1 GiB", format_bytes(GiB), "1 GiB")
    expect("format 10.5 MiB", format_bytes(10.5 * MiB), "10.5 MiB")
    expect("format 0.25 s", format_seconds(0.25), "250 ms")
    expect("format 4.26 ms", format_seconds(0.00426), "4.3 ms")
    expect("format 2.5 s", format_seconds(2.5), "2.50 s")
    expect("ratio", format_ratio(ratio(3.0, 2.0)), "1.50x")
    expect("ratio missing", format_ratio(ratio(None, 2.0)), "—")
    expect("ratio infinite", format_ratio(math.inf), "∞")

    report = sample_report()
    untar, tput, rss, fail = report.rows
    expect("best peer of a time row", untar.best_peer().subject, "gocryptfs")
    expect("time ratio", format_ratio(untar.ratio()), "0.50x")
    expect("time row met", untar.met(), True)
    expect("best peer skips the unavailable", tput.best_peer().subject, "gocryptfs")
    expect("throughput ratio", format_ratio(tput.ratio()), "0.49x")
    expect("throughput row missed", tput.met(), False)
    expect("absolute target", rss.met(), True)
    expect("no verdict without our number", fail.met(), None)
    expect("ours failed", fail.ours_failed(), True)

    grid = report.grid()
    expect(
        "columns",
        grid[0],
        ["workload", "occlumfs", "gocryptfs", "securefs", "ratio to best", "target", "verdict"],
    )
    expect(
        "untar cells", grid[1], ["untar", "2.00 s", "4.00 s", "4.00 s", "0.50x", "≤ 1.00x", "met"]
    )
    expect("unavailable cell", grid[2][3], "unavailable")
    expect("verdict text", grid[2][6], "MISSED")
    expect("absent peer column is blank", grid[3][3], "")
    expect("rss cell", grid[3][1], "90 MB")
    expect("failed cell", grid[4][1], "failed")

    expect(
        "verdict line",
        report.verdict_line(),
        "targets met: 2 of 4; missed: seq | read; not judged (a side is missing): fio",
    )
    markdown = render_markdown(report)
    expect("markdown escapes pipes", "seq \\| read" in markdown, True)
    expect("markdown names the failure", "fio — occlumfs: failed: boom" in markdown, True)
    soak = SuiteReport("soak", "Soak", summary="soak: 3 crashes, 3 recovered", failed="")
    expect("table-less suite", render_markdown(soak), "#### Soak\n\nsoak: 3 crashes, 3 recovered")
    expect("table-less suite passes", soak.ours_failed(), False)
    text = render_text(report)
    widths = {len(line) for line in text.splitlines()[1:3]}
    expect("text header aligned with rule", len(widths), 1)
    return problems
