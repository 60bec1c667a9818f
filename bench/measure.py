"""Taking samples: round-robin over subjects, one failure never sinks the others.

Subjects take turns within each repetition (ours, peer A, peer B, ours, ...)
so slow drift in the machine's load lands on every subject alike; the row
reports the median of the repetitions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import Result, Row
from bench.stats import MiB, Unit, throughput
from bench.subjects import Subject
from bench.system import CacheDropper, CommandFailed, Unavailable, log, run, shell, timed

Sample = Callable[[Subject], float]


@dataclass
class Settings:
    """What the command line chose, shared by every suite."""

    scratch: Path
    quick: bool
    reps: int
    size: int  # the "1 GB" of the issues
    stand_in: bool
    drop_caches: CacheDropper
    log_dir: Path
    extra_notes: list[str] = field(default_factory=list)


def new_row(
    key: str, workload: str, unit: Unit, ours: Subject, peers: Sequence[Subject], target=None
) -> Row:
    return Row(key, workload, unit, Result(ours.name), [Result(p.name) for p in peers], target)


def result_for(row: Row, subject: Subject) -> Result:
    for result in (row.ours, *row.peers):
        if result.subject == subject.name:
            return result
    raise KeyError(subject.name)


def measure(phases: Sequence[tuple[Row, Sample]], subjects: Sequence[Subject], reps: int) -> None:
    """Fill each row with ``reps`` samples per subject, phases in order within a repetition."""
    for rep in range(reps):
        for row, sample in phases:
            for subject in subjects:
                result = result_for(row, subject)
                if result.error is not None:
                    continue
                try:
                    value = sample(subject)
                except Unavailable as exc:
                    result.error = str(exc)
                    log(f"{row.workload} / {subject.name}: {exc}")
                    continue
                except Exception as exc:
                    result.error = f"failed: {exc}"
                    log(f"{row.workload} / {subject.name}: FAILED: {exc}")
                    continue
                result.samples.append(value)
                log(f"{row.workload} / {subject.name} #{rep + 1}: {row.unit.format(value)}")


def mark_unavailable(rows: Sequence[Row], subject: Subject, reason: str) -> None:
    for row in rows:
        result = result_for(row, subject)
        if result.error is None:
            result.error = reason


def note_server_logs(report, subjects: Sequence[Subject], quick: bool) -> None:
    """The closing notes of a suite: our servers' error lines, and what --quick means."""
    from bench.subjects import OcclumfsSubject

    for subject in subjects:
        if isinstance(subject, OcclumfsSubject):
            problems = subject.log_problems()
            if problems:
                report.notes.append(
                    f"server log {subject.log_file.name}: {len(problems)} error line(s), "
                    f"first: {problems[0][:200]}"
                )
    if quick:
        report.notes.append("--quick: toy sizes; these ratios do not judge the targets")


# Workload primitives, the same for every subject -----------------------------------


class PatternBuffer:
    """64 MiB of distinct pseudo-random bytes, cycled, generated once outside any timing."""

    def __init__(self, size: int = 64 * MiB) -> None:
        from bench.datasets import Keystream

        self.data = memoryview(Keystream("sequential-write").read(size))


_PATTERN: PatternBuffer | None = None


def write_file(path: Path, size: int, *, fsync: bool = True) -> float:
    """Seconds to write ``size`` bytes in 1 MiB requests, then fsync and close."""
    global _PATTERN
    if _PATTERN is None:
        _PATTERN = PatternBuffer()
    data = _PATTERN.data
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < size:
            pos = offset % len(data)
            n = os.write(fd, data[pos : pos + min(MiB, size - offset, len(data) - pos)])
            offset += n
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def read_file(path: Path) -> tuple[int, float]:
    """(bytes, seconds) to read a whole file in 1 MiB requests."""
    buf = bytearray(MiB)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total, time.perf_counter() - start


def cold_read_sample(name: str, size: int, drop_caches: Callable[[], None]) -> Sample:
    """MB/s of reading file ``name`` (``size`` bytes) of a subject just mounted cold."""

    def sample(subject: Subject) -> float:
        with subject.mounted(drop_caches) as m:
            n, seconds = read_file(m / name)
        if n != size:
            raise CommandFailed(f"read {n} bytes, expected {size}")
        return throughput(n, seconds)

    return sample


def tree_samples(top: str, drop_caches: Callable[[], None]) -> tuple[Sample, Sample]:
    """Seconds of a cold ``ls -lR``, and of a cold read of every file, of ``top`` in a mount."""

    def ls_lr(subject: Subject) -> float:
        with subject.mounted(drop_caches) as m:
            return timed(shell(f"ls -lR '{m / top}' > /dev/null"))

    def read_all(subject: Subject) -> float:
        with subject.mounted(drop_caches) as m:
            return timed(
                shell(f"cd '{m / top}' && find . -type f -print0 | xargs -0 cat > /dev/null")
            )

    return ls_lr, read_all


def fio_iops(path: Path, rw: str, size: int, runtime: int) -> float:
    """IOPS of a single-threaded 4 KiB fio job (buffered, synchronous), ``rw`` randread/write."""
    cmd = [
        "fio",
        f"--name={rw}",
        f"--filename={path}",
        f"--rw={rw}",
        "--bs=4k",
        f"--size={size}",
        f"--runtime={runtime}",
        "--time_based",
        "--ioengine=psync",
        "--invalidate=1",
        "--output-format=json",
    ]
    if rw == "randwrite":
        cmd.append("--end_fsync=1")
    done = run(cmd, timeout=runtime + 600)
    text = done.stdout.decode(errors="replace")
    job = json.loads(text[text.index("{") :])["jobs"][0]
    side = job["read" if rw == "randread" else "write"]
    if job.get("error"):
        raise RuntimeError(f"fio reported error {job['error']}")
    return float(side["iops"])
