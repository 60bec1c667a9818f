"""Encrypted writable filesystem workloads (issue 3) against gocryptfs and securefs.

The workload of record is the one gocryptfs publishes: sequential write with
fsync, cold sequential read, untar of a source tree, ``ls -lR``, ``rm -rf``;
plus 4 KiB random I/O with fio, two fsync-heavy real programs (the sqlite3
CLI inserting one autocommit row at a time, and ``git init/add/commit`` of
the stdlib tree; issue 11) and the server's peak memory. Each subject keeps
its backing store under the scratch directory on the same disk.

``BENCH_SEFS_ONLY=sqlite,git`` (any of seq, tree, fio, sqlite, git, many) runs
only those groups, e.g. to measure one change quickly; the report holds only
their rows (and the memory row). The ``many`` group (100,000 small files,
issue 11) is in :mod:`bench.sefs_many`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench import datasets
from bench.measure import (
    Settings,
    fio_iops,
    mark_unavailable,
    measure,
    new_row,
    read_file,
    result_for,
    write_file,
)
from bench.report import Row, SuiteReport
from bench.sefs_many import ManyFiles
from bench.stats import (
    IOPS,
    MEGABYTES,
    SECONDS,
    THROUGHPUT,
    MiB,
    Target,
    ahead_of_best,
    format_bytes,
    format_seconds,
    median,
    throughput,
)
from bench.subjects import (
    Gocryptfs,
    MemStandIn,
    OcclumfsSubject,
    OcclumSefs,
    Securefs,
    Subject,
    occlumfs_has,
    teardown_all,
)
from bench.system import CommandFailed, Unavailable, log, run, shell, timed

PASSWORD = "occlumfs-bench-password"
GROUPS = ("seq", "tree", "fio", "sqlite", "git", "many")
SQLITE_DB = "bench.db"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}
SEQ_FILE = "seq.bin"
FIO_FILE = "fio.dat"
TREE = "stdlib"


class SefsSuite:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.root = settings.scratch / "sefs"
        self.fio_size = 16 * MiB if settings.quick else 256 * MiB
        self.fio_runtime = 1 if settings.quick else 8
        self.inserts = 200 if settings.quick else 10_000
        chosen = os.environ.get("BENCH_SEFS_ONLY", "")
        self.groups = {g for g in chosen.split(",") if g} if chosen else set(GROUPS)
        unknown = self.groups - set(GROUPS)
        if unknown:
            raise ValueError(f"BENCH_SEFS_ONLY: unknown group(s) {sorted(unknown)}; use {GROUPS}")

    def subjects(self) -> tuple[Subject, list[Subject]]:
        mnt = self.root / "mnt"
        passfile = self.root / "password"
        passfile.write_text(PASSWORD + "\n")
        log_file = self.s.log_dir / "sefs.log"
        ours: Subject
        if self.s.stand_in and not occlumfs_has("sefs", "create"):
            ours = MemStandIn(mnt / "ours", log_file)
        else:
            ours = OcclumSefs(
                self.root / "store-ours", self.root / "ours.key", mnt / "ours", log_file
            )
        peers: list[Subject] = [
            Gocryptfs(self.root / "store-gocryptfs", mnt / "gocryptfs", passfile),
            Securefs(self.root / "store-securefs", mnt / "securefs", PASSWORD),
        ]
        return ours, peers

    def run(self) -> SuiteReport:
        report = SuiteReport("sefs", "Encrypted writable filesystem (issue 3)")
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        ours, peers = self.subjects()
        many = ManyFiles(self.s, self.root, self.root / "ours.key", self.root / "password")
        try:
            self._run(report, ours, peers)
            if "many" in self.groups:
                many.run(report, isinstance(ours, OcclumSefs))
                for subject in (ours, *peers):  # the suite's peak counts these mounts too
                    for other in many.subjects()[:-1]:  # not the opt-in million-file one
                        if other.name == subject.name and other.peak_rss_mb is not None:
                            subject.peak_rss_mb = max(subject.peak_rss_mb or 0.0, other.peak_rss_mb)
                            subject.mounts += other.mounts
            report.rows.append(self.rss_row(ours, peers))
        finally:
            teardown_all([ours, *peers, *many.subjects()])
        if isinstance(ours, OcclumfsSubject):
            problems = ours.log_problems()
            if problems:
                report.notes.append(
                    f"server log: {len(problems)} error line(s), first: {problems[0][:200]}"
                )
        if isinstance(ours, MemStandIn):
            report.notes.append(
                "ours is the in-memory stand-in: 'cold' runs only drop kernel "
                "caches, nothing is encrypted"
            )
        if self.s.quick:
            report.notes.append("--quick: toy sizes; these ratios do not judge the targets")
        return report

    def _run(self, report: SuiteReport, ours: Subject, peers: list[Subject]) -> None:
        s, size, reps = self.s, self.s.size, self.s.reps
        everyone = [ours, *peers]
        src = self.root / "src"
        log("copying the stdlib tree and making its tarball")
        files, nbytes = datasets.copy_stdlib(src / TREE, max_files=200 if s.quick else None)
        tarball = self.root / "stdlib.tar"
        datasets.make_tarball(src / TREE, tarball)
        shutil.rmtree(src)
        tree_label = f"{files:,} files, {format_bytes(nbytes)}"

        def row(key: str, label: str, unit, versus: str | None = None) -> Row:
            target = ahead_of_best(unit)
            if versus is not None:  # the peer the row names; the best peer is noted
                target = Target(target.kind, target.bound, versus=versus)
            return new_row(f"sefs.{key}", label, unit, ours, peers, target)

        rows = {
            "write": row(
                "write.seq", f"sequential write + fsync, {format_bytes(size)}", THROUGHPUT
            ),
            "read": row("read.seq", f"cold sequential read, {format_bytes(size)}", THROUGHPUT),
            "untar": row("untar", f"untar stdlib ({tree_label})", SECONDS),
            "ls": row("ls", "cold ls -lR of the untarred tree", SECONDS),
            "rm": row("rm", "cold rm -rf of the untarred tree", SECONDS),
            "randread": row(
                "fio.randread",
                f"fio 4 KiB random read, {format_bytes(self.fio_size)} file, {self.fio_runtime} s",
                IOPS,
            ),
            "randwrite": row(
                "fio.randwrite",
                f"fio 4 KiB random write + end fsync, "
                f"{format_bytes(self.fio_size)} file, {self.fio_runtime} s",
                IOPS,
            ),
            "sqlite": row(
                "sqlite",
                f"sqlite3 CLI, {self.inserts:,} autocommit inserts (one fsync'd transaction each)",
                SECONDS,
                versus="gocryptfs",
            ),
            "git": row("git", "git init + add -A + commit of the stdlib tree", SECONDS),
        }
        groups = {
            "seq": ["write", "read"],
            "tree": ["untar", "ls", "rm"],
            "fio": ["randread", "randwrite"],
            "sqlite": ["sqlite"],
            "git": ["git"],
            "many": [],  # bench.sefs_many adds its own rows
        }
        report.rows += [rows[k] for group in GROUPS if group in self.groups for k in groups[group]]

        for subject in everyone:
            try:
                log(f"creating the {subject.name} store")
                subject.setup()
            except Unavailable as exc:
                mark_unavailable(list(rows.values()), subject, str(exc))
            except Exception as exc:
                mark_unavailable(list(rows.values()), subject, f"failed: setting up: {exc}")
        # The tarball is read from the page cache: untar measures the filesystem.
        run(shell(f"cat '{tarball}' > /dev/null"))

        def ensure_file(m: Path, name: str, nbytes: int) -> bool:
            """Lay a file down (untimed) if a non-persistent subject lost it; True if it did."""
            path = m / name
            if path.exists() and path.stat().st_size == nbytes:
                return False
            write_file(path, nbytes)
            return True

        def ensure_tree(m: Path) -> bool:
            if (m / TREE).exists():
                return False
            (m / TREE).mkdir()
            run(["tar", "-xf", str(tarball), "-C", str(m / TREE)])
            return True

        def seq_write(subject: Subject) -> float:
            with subject.mounted() as m:
                (m / SEQ_FILE).unlink(missing_ok=True)
                run(["sync"])
                seconds = write_file(m / SEQ_FILE, size)
            return throughput(size, seconds)

        def seq_read(subject: Subject) -> float:
            with subject.mounted(s.drop_caches) as m:
                if ensure_file(m, SEQ_FILE, size):
                    s.drop_caches()
                n, seconds = read_file(m / SEQ_FILE)
            if n != size:
                raise CommandFailed(f"read back {n} bytes, expected {size}")
            return throughput(n, seconds)

        if "seq" in self.groups:
            measure([(rows["write"], seq_write), (rows["read"], seq_read)], everyone, reps)
            self.remove_everywhere(everyone, SEQ_FILE)

        # Like gocryptfs' benchmark, the untar row stops when tar exits. What a
        # server still holds then is flushed at unmount: that time is noted too.
        unmount_after_untar: dict[str, list[float]] = {}

        def untar(subject: Subject) -> float:
            with subject.mounted() as m:
                if (m / TREE).exists():
                    run(["rm", "-rf", str(m / TREE)])
                (m / TREE).mkdir()
                run(["sync"])
                seconds = timed(["tar", "-xf", str(tarball), "-C", str(m / TREE)])
                start = time.perf_counter()
            unmount_after_untar.setdefault(subject.name, []).append(time.perf_counter() - start)
            return seconds

        def ls_lr(subject: Subject) -> float:
            with subject.mounted(s.drop_caches) as m:
                if ensure_tree(m):
                    s.drop_caches()
                return timed(shell(f"ls -lR '{m / TREE}' > /dev/null"))

        def rm_rf(subject: Subject) -> float:
            with subject.mounted(s.drop_caches) as m:
                if ensure_tree(m):
                    s.drop_caches()
                seconds = timed(["rm", "-rf", str(m / TREE)])
                if (m / TREE).exists():
                    raise CommandFailed("the tree is still there after rm -rf")
                return seconds

        if "tree" in self.groups:
            measure(
                [(rows["untar"], untar), (rows["ls"], ls_lr), (rows["rm"], rm_rf)], everyone, reps
            )
        if unmount_after_untar:
            rows["untar"].notes.append(
                "unmount right after tar exits (flush and commit), median: "
                + ", ".join(
                    f"{name} {format_seconds(median(times))}"
                    for name, times in unmount_after_untar.items()
                )
            )

        def fio(rw: str):
            def sample(subject: Subject) -> float:
                with subject.mounted(s.drop_caches) as m:
                    if ensure_file(m, FIO_FILE, self.fio_size):
                        s.drop_caches()
                    return fio_iops(m / FIO_FILE, rw, self.fio_size, self.fio_runtime)

            return sample

        if "fio" not in self.groups:
            pass
        elif shutil.which("fio") is None:
            for subject in everyone:
                mark_unavailable(
                    [rows["randread"], rows["randwrite"]], subject, "unavailable: fio not installed"
                )
        else:
            for subject in everyone:  # lay the file down once, untimed
                if result_for(rows["randread"], subject).error is None:
                    try:
                        with subject.mounted() as m:
                            ensure_file(m, FIO_FILE, self.fio_size)
                    except Exception as exc:
                        log(f"{subject.name}: laying down the fio file failed: {exc}")
            measure(
                [(rows["randread"], fio("randread")), (rows["randwrite"], fio("randwrite"))],
                everyone,
                reps,
            )

        self.programs(rows, everyone, ensure_tree)

    def programs(self, rows: dict[str, Row], everyone: list[Subject], ensure_tree) -> None:
        """The fsync-heavy real programs: sqlite3 autocommit inserts, git on a source tree."""
        reps = self.s.reps
        script = self.root / "inserts.sql"
        script.write_text(
            "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT);\n"
            + "".join(
                f"INSERT INTO t(v) VALUES ('row {i} of the sqlite benchmark');\n"
                for i in range(self.inserts)
            )
        )

        def sqlite(subject: Subject) -> float:
            with subject.mounted() as m:
                for name in (SQLITE_DB, SQLITE_DB + "-journal"):
                    (m / name).unlink(missing_ok=True)
                run(["sync"])
                seconds = timed(shell(f"sqlite3 '{m / SQLITE_DB}' < '{script}'"))
                rows_in = run(["sqlite3", str(m / SQLITE_DB), "SELECT count(*) FROM t"])
                if int(rows_in.stdout.decode().strip() or 0) != self.inserts:
                    raise CommandFailed(f"the table holds {rows_in.stdout!r} rows")
                (m / SQLITE_DB).unlink()
            return seconds

        def git(subject: Subject) -> float:
            with subject.mounted() as m:
                ensure_tree(m)
                shutil.rmtree(m / TREE / ".git", ignore_errors=True)
                run(["sync"])
                env = {**os.environ, **GIT_ENV}
                start = time.perf_counter()
                for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "stdlib"]):
                    done = subprocess.run(
                        ["git", "-C", str(m / TREE), *cmd],
                        env=env,
                        capture_output=True,
                        check=False,
                    )
                    if done.returncode != 0:
                        raise CommandFailed(f"git {cmd[0]}: {done.stderr.decode().strip()[-200:]}")
                return time.perf_counter() - start

        phases = []
        for key, program, sample in (("sqlite", "sqlite3", sqlite), ("git", "git", git)):
            if key not in self.groups:
                continue
            if shutil.which(program) is None:
                for subject in everyone:
                    mark_unavailable([rows[key]], subject, f"unavailable: {program} not installed")
                continue
            phases.append((rows[key], sample))
        measure(phases, everyone, reps)
        if "git" in self.groups:
            self.remove_everywhere(everyone, TREE)

    def remove_everywhere(self, subjects: list[Subject], name: str) -> None:
        """Free the disk between workloads; a failure here is reported, not fatal."""
        for subject in subjects:
            if subject.mounts == 0:
                continue
            try:
                with subject.mounted() as m:
                    if (m / name).is_dir():
                        run(["rm", "-rf", str(m / name)])
                    else:
                        (m / name).unlink(missing_ok=True)
            except Exception as exc:
                log(f"{subject.name}: removing {name} failed: {exc}")

    def rss_row(self, ours: Subject, peers: list[Subject]) -> Row:
        row = new_row(
            "sefs.rss",
            "server peak RSS over the whole suite",
            MEGABYTES,
            ours,
            peers,
            Target("ratio_max", 2.0, MEGABYTES, versus="securefs"),
        )
        for subject in (ours, *peers):
            result = result_for(row, subject)
            if subject.peak_rss_mb is not None:
                result.samples.append(subject.peak_rss_mb)
            elif subject.mounts == 0:
                result.error = "unavailable: never mounted"
            else:
                result.error = "failed: could not read the server's VmHWM"
        row.notes.append(f"max VmHWM over every mount of the suite ({ours.mounts} mounts of ours)")
        return row


def run_sefs_suite(settings: Settings) -> SuiteReport:
    return SefsSuite(settings).run()
