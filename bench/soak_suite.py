"""The SEFS crash soak (bench/sefs_crash_soak.py, owned by SEFS) as a suite of ``make bench``.

It is a correctness run, not a race: no peers and no ratios. The suite runs
the soak in its own process and reports its summary line (how many crashes,
how many recovered clean); any failed recovery fails the suite as one of ours.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.measure import Settings
from bench.report import SuiteReport
from bench.system import log

SOAK = Path(__file__).resolve().parent / "sefs_crash_soak.py"


def soak_available() -> bool:
    return SOAK.exists()


def run_soak_suite(settings: Settings) -> SuiteReport:
    report = SuiteReport("soak", "SEFS crash soak (issue 3)")
    if not soak_available():
        report.failed = f"unavailable: {SOAK.name} is not in bench/ yet"
        return report
    counts = ["--power-cuts", "20", "--kills", "2"] if settings.quick else []
    cmd = [sys.executable, "-m", "bench.sefs_crash_soak", *counts]
    log("running the SEFS crash soak: " + " ".join(cmd[1:]))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    lines = done.stdout.strip().splitlines()
    summary = next((line for line in reversed(lines) if line.startswith("sefs crash soak:")), "")
    report.summary = summary or "the soak printed no summary line"
    report.notes += [line for line in lines if line.startswith("FAILED")][:20]
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        report.failed = f"the soak exited with status {done.returncode}"
        report.notes += [f"stderr: {line}" for line in tail]
    return report
