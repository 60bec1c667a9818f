"""The many-small-files rows of the SEFS suite (issue 11), the group ``many``.

* create 100,000 files of 100 bytes in 100 directories with a Python loop
  through each mount (``open(O_CREAT|O_EXCL)``, one ``write``, ``close``);
* a cold ``ls -lR`` of them (remount, cache drop);
* a cold read of every one (``find -type f -print0 | xargs -0 cat``);
* our server's RSS right after mounting that store, against gocryptfs' peak
  over the walk (the ``ls -lR`` mount and the read mount);
* opt-in (``BENCH_SEFS_MILLION=1``): our server's peak RSS over a mount of a
  1,000,000-file store doing ``ls -lR`` and a read of every file.

Each repetition starts every subject from an empty store of its own (not the
suite's shared one), so the memory row measures a store holding exactly these
files, and no repetition has to delete the last one's tree through the mount.
``--quick`` scales the counts down (2,000 and 10,000 files);
``BENCH_SEFS_MANY_FILES=N`` sets the first count (N/1,000 directories).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.measure import Settings, mark_unavailable, measure, new_row, result_for
from bench.report import Row, SuiteReport
from bench.stats import MEGABYTES, SECONDS, Target, format_seconds, median
from bench.subjects import Gocryptfs, OcclumSefs, Securefs, Subject
from bench.system import CommandFailed, Unavailable, log, peak_rss_mb, run, shell

FILE_BYTES = 100
TOP = "many"
MILLION_ENV = "BENCH_SEFS_MILLION"
FILES_ENV = "BENCH_SEFS_MANY_FILES"
MILLION_RSS_MB = 150


def create_files(top: Path, files: int, dirs: int) -> float:
    """Seconds to create ``files`` files of 100 distinct bytes spread over ``dirs`` directories."""
    per_dir, pad = files // dirs, b"-" * (FILE_BYTES - 9)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    start = time.perf_counter()
    os.mkdir(top)
    for d in range(dirs):
        directory = f"{top}/d{d:04d}"
        os.mkdir(directory)
        for f in range(per_dir):
            fd = os.open(f"{directory}/f{f:06d}", flags, 0o644)
            try:
                if os.write(fd, b"%08d " % (d * per_dir + f) + pad) != FILE_BYTES:
                    raise CommandFailed(f"short write in {directory}")
            finally:
                os.close(fd)
    return time.perf_counter() - start


def walk_ls(top: Path, files: int) -> float:
    """Seconds of ``ls -lR`` of ``top``; checks that it listed every file."""
    start = time.perf_counter()
    done = run(shell(f"ls -lR '{top}' | grep -c '^-'"))
    seconds = time.perf_counter() - start
    listed = int(done.stdout.decode().strip() or 0)
    if listed != files:
        raise CommandFailed(f"ls -lR listed {listed} files, expected {files}")
    return seconds


def walk_read(top: Path, files: int) -> float:
    """Seconds to read every file under ``top``; checks that every byte arrived."""
    start = time.perf_counter()
    done = run(shell(f"cd '{top}' && find . -type f -print0 | xargs -0 cat | wc -c"))
    seconds = time.perf_counter() - start
    got = int(done.stdout.decode().strip() or 0)
    if got != files * FILE_BYTES:
        raise CommandFailed(f"read {got} bytes, expected {files * FILE_BYTES}")
    return seconds


class ManyFiles:
    """The ``many`` group: its own subjects, rows, and the peaks they reached."""

    def __init__(self, settings: Settings, root: Path, key_file: Path, passfile: Path) -> None:
        self.s = settings
        self.files, self.dirs = (2_000, 20) if settings.quick else (100_000, 100)
        chosen = os.environ.get(FILES_ENV, "")
        if chosen:  # another size, 1,000 files a directory as at full size
            self.files = int(chosen)
            self.dirs = max(1, self.files // 1000)
            self.files -= self.files % self.dirs
        self.million = os.environ.get(MILLION_ENV, "") not in ("", "0")
        self.million_files, self.million_dirs = (
            (10_000, 100) if settings.quick else (1_000_000, 1_000)
        )
        self.root = root / "many"
        mnt, log_file = self.root / "mnt", settings.log_dir / "sefs-many.log"
        self.ours = OcclumSefs(self.root / "store-ours", key_file, mnt / "ours", log_file)
        self.peers: list[Subject] = [
            Gocryptfs(self.root / "store-gocryptfs", mnt / "gocryptfs", passfile),
            Securefs(self.root / "store-securefs", mnt / "securefs", passfile.read_text().strip()),
        ]
        self.million_subject = OcclumSefs(
            self.root / "store-million", key_file, mnt / "million", log_file
        )

    def subjects(self) -> list[Subject]:
        """Every subject of the group, the opt-in million-file store last."""
        return [self.ours, *self.peers, self.million_subject]

    def run(self, report: SuiteReport, ours_is_sefs: bool) -> None:
        everyone = [self.ours, *self.peers]
        label = f"{self.files:,} files of {FILE_BYTES} bytes in {self.dirs} directories"

        def row(key: str, workload: str) -> Row:
            # Issue 11 states these rows against gocryptfs; the best peer is noted.
            target = Target("ratio_max", 1.0, versus="gocryptfs")
            return new_row(f"sefs.many.{key}", workload, SECONDS, self.ours, self.peers, target)

        create = row("create", f"create {label} (Python loop)")
        ls = row("ls", f"cold ls -lR of the {self.files:,} files")
        read = row("read", f"cold read of every one of the {self.files:,} files")
        gocryptfs = [p for p in self.peers if p.name == "gocryptfs"]
        rss = new_row(
            "sefs.many.rss_mount",
            f"server RSS right after mounting the {self.files:,}-file store",
            MEGABYTES,
            self.ours,
            gocryptfs,
            Target("ratio_max", 1.0, MEGABYTES, versus="gocryptfs"),
        )
        rows = [create, ls, read, rss]
        report.rows += rows
        if not ours_is_sefs:
            mark_unavailable(rows, self.ours, "unavailable: needs the real SEFS (no stand-in)")
        for subject in everyone:
            try:
                subject.setup()
            except Exception as exc:
                reason = str(exc) if isinstance(exc, Unavailable) else f"failed: setting up: {exc}"
                mark_unavailable(rows, subject, reason)

        unmount_after: dict[str, list[float]] = {}
        after_mount: dict[str, float] = {}  # VmHWM right after mounting, per subject
        walk_peak: dict[str, float] = {}  # VmHWM over the ls and read mounts

        def note_peak(subject: Subject) -> None:
            if subject.last_peak_rss_mb is not None:
                walk_peak[subject.name] = max(
                    walk_peak.get(subject.name, 0.0), subject.last_peak_rss_mb
                )

        def create_sample(subject: Subject) -> float:
            subject.recreate()
            with subject.mounted() as m:
                run(["sync"])
                seconds = create_files(m / TOP, self.files, self.dirs)
                start = time.perf_counter()
            unmount_after.setdefault(subject.name, []).append(time.perf_counter() - start)
            return seconds

        def ls_sample(subject: Subject) -> float:
            with subject.mounted(self.s.drop_caches) as m:
                mounted = peak_rss_mb(subject.server_pid())
                if mounted is not None:
                    after_mount[subject.name] = max(after_mount.get(subject.name, 0.0), mounted)
                seconds = walk_ls(m / TOP, self.files)
            note_peak(subject)
            return seconds

        def read_sample(subject: Subject) -> float:
            with subject.mounted(self.s.drop_caches) as m:
                seconds = walk_read(m / TOP, self.files)
            note_peak(subject)
            return seconds

        measure(
            [(create, create_sample), (ls, ls_sample), (read, read_sample)],
            everyone,
            self.s.reps,
        )
        if unmount_after:
            create.notes.append(
                "unmount right after the loop (flush and commit), median: "
                + ", ".join(f"{n} {format_seconds(median(t))}" for n, t in unmount_after.items())
            )
        self.fill_rss(rss, after_mount, walk_peak)
        if self.million and ours_is_sefs:
            report.rows.append(self.million_row())

    def fill_rss(self, rss: Row, after_mount: dict[str, float], walk_peak: dict[str, float]):
        ours = result_for(rss, self.ours)
        if ours.error is None:
            if self.ours.name in after_mount:
                ours.samples.append(after_mount[self.ours.name])
            else:
                ours.error = "failed: no cold mount of the store was measured"
        for peer in rss.peers:
            if peer.error is None:
                if peer.subject in walk_peak:
                    peer.samples.append(walk_peak[peer.subject])
                else:
                    peer.error = "failed: no walk was measured"
        shown = ", ".join(f"{name} {value:.0f} MB" for name, value in walk_peak.items())
        if shown:
            rss.notes.append(
                "ours: VmHWM as the mount returns; the peer's: its peak over the ls -lR and "
                f"read mounts. Peaks over those mounts (VmHWM): {shown}"
            )

    def million_row(self) -> Row:
        """Our server's peak RSS over a cold mount of a huge store walked whole."""
        subject, files, dirs = self.million_subject, self.million_files, self.million_dirs
        row = new_row(
            "sefs.many.rss_million",
            f"server peak RSS, {files:,}-file store: ls -lR + read of each",
            MEGABYTES,
            subject,
            [],
            Target("value_max", MILLION_RSS_MB, MEGABYTES),
        )
        try:
            subject.recreate()
            log(f"creating {files:,} files through our mount (untimed)")
            with subject.mounted() as m:
                created = create_files(m / TOP, files, dirs)
            with subject.mounted(self.s.drop_caches) as m:
                mounted = peak_rss_mb(subject.server_pid())
                walk_ls(m / TOP, files)
                walk_read(m / TOP, files)
                walked = peak_rss_mb(subject.server_pid())
        except Exception as exc:
            row.ours.error = f"failed: {exc}"
            return row
        if walked is None:
            row.ours.error = "failed: could not read the server's VmHWM"
            return row
        row.ours.samples.append(walked)
        row.notes.append(
            f"VmHWM right after the mount {mounted or 0:.0f} MB; creating the files took "
            f"{format_seconds(created)}; one sample ({MILLION_ENV}=1)"
        )
        return row
