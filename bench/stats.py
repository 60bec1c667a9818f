"""Pure arithmetic and formatting for benchmark results: no I/O, no timing.

Every number the harness prints goes through here, so the self-check
(``python -m bench --only-harness``) and tests/test_bench_harness.py can pin
the rounding and the direction of every comparison.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(text: str) -> int:
    """``"512M"``, ``"1G"``, ``"1GiB"``, ``"4096"`` → bytes (binary multiples)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 512M or 1G)")
    number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


def median(samples: Sequence[float]) -> float:
    if not samples:
        raise ValueError("median of no samples")
    return float(statistics.median(samples))


def spread(samples: Sequence[float]) -> float:
    """(max - min) / median: how noisy a measurement was, 0.0 for one sample."""
    if len(samples) < 2:
        return 0.0
    mid = median(samples)
    return (max(samples) - min(samples)) / mid if mid else math.inf


@dataclass(frozen=True)
class Unit:
    """What a row's numbers mean and which way is better."""

    symbol: str
    higher_is_better: bool

    def format(self, value: float) -> str:
        if self.symbol == "s":
            return format_seconds(value)
        if self.symbol == "MB":
            return f"{value:.0f} MB" if value >= 10 else f"{value:.1f} MB"
        return f"{_three_figures(value)} {self.symbol}"

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b


SECONDS = Unit("s", higher_is_better=False)
THROUGHPUT = Unit("MB/s", higher_is_better=True)
IOPS = Unit("IOPS", higher_is_better=True)
MEGABYTES = Unit("MB", higher_is_better=False)


def _three_figures(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_seconds(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 100:
        return f"{seconds:.2f} s"
    return f"{seconds:.0f} s"


def format_bytes(size: int | float) -> str:
    """Binary sizes the way the issues write them: ``1 GiB``, ``256 MiB``, ``10.0 MiB``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{int(size)} B"


def throughput(nbytes: int, seconds: float) -> float:
    """Decimal megabytes per second, the unit gocryptfs and the issues use."""
    return nbytes / MB / seconds if seconds > 0 else math.inf


def format_ratio(ratio: float | None) -> str:
    if ratio is None or math.isnan(ratio):
        return "—"
    if math.isinf(ratio):
        return "∞"
    return f"{ratio:.2f}x"


@dataclass(frozen=True)
class Target:
    """A goal from the issues: a bound on the ratio to the best peer, or on our value."""

    kind: str  # "ratio_max" | "ratio_min" | "value_max"
    bound: float
    unit: Unit | None = None  # for value_max, how to print the bound
    # For a ratio: the peer the issue names, instead of the best peer of the row.
    versus: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("ratio_max", "ratio_min", "value_max"):
            raise ValueError(f"unknown target kind {self.kind!r}")

    def describe(self) -> str:
        against = f" {self.versus}" if self.versus else ""
        if self.kind == "ratio_max":
            return f"≤ {self.bound:.2f}x{against}"
        if self.kind == "ratio_min":
            return f"≥ {self.bound:.2f}x{against}"
        return f"≤ {self.unit.format(self.bound) if self.unit else self.bound}"

    def met(self, ratio: float | None, value: float | None) -> bool | None:
        """True/False, or None when there is nothing to judge (a side is missing)."""
        if self.kind == "value_max":
            return None if value is None else value <= self.bound
        if ratio is None or math.isnan(ratio):
            return None
        return ratio <= self.bound if self.kind == "ratio_max" else ratio >= self.bound


def ahead_of_best(unit: Unit) -> Target:
    """Target for "every column ahead of the best peer", in the row's own direction."""
    return Target("ratio_min", 1.0) if unit.higher_is_better else Target("ratio_max", 1.0)


def ratio(ours: float | None, best: float | None) -> float | None:
    """Our number over the best peer's, in the row's unit (so 0.5x time is twice as fast)."""
    if ours is None or best is None:
        return None
    if best == 0:
        return math.inf if ours else 1.0
    return ours / best


def verdict_text(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "—"}[met]
