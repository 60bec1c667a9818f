"""Image-layer workloads (issue 2): build, cold reads, listing, mount time, server memory.

The peer for reads is fuse-overlayfs with only a lower directory: the same
files on the same ext4, served read-only by a C FUSE server with no checking.
The peer for builds is the floor any builder pays: read the tree once and
hash it (``tar -c SRC | openssl dgst -sha256``: OpenSSL uses the CPU's SHA
extensions, as hashlib does; coreutils ``sha256sum`` does not, so it made a
soft floor and is now only shown for scale).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from bench import datasets
from bench.measure import (
    Settings,
    cold_read_sample,
    mark_unavailable,
    measure,
    new_row,
    note_server_logs,
    tree_samples,
)
from bench.report import OURS, Result, Row, SuiteReport
from bench.stats import (
    MEGABYTES,
    SECONDS,
    THROUGHPUT,
    MiB,
    Target,
    format_bytes,
    format_seconds,
    median,
)
from bench.subjects import (
    Contender,
    FuseOverlay,
    MemStandIn,
    OcclumImage,
    Subject,
    occlumfs_cmd,
    occlumfs_has,
    teardown_all,
)
from bench.system import CommandFailed, Unavailable, log, run, shell, timed

TAR_FLOOR = "tar -c | openssl dgst -sha256"
# Run in a fresh interpreter: import first (untimed), then time opening the image.
OPEN_TIMER = """
import sys, time
from occlumfs.merkle import open_image_fs
start = time.perf_counter()
fs = open_image_fs(sys.argv[1], digest=sys.argv[2], key=None)
elapsed = time.perf_counter() - start
fs.close()
print(elapsed)
"""
SMALL_IMAGE = 10 * MiB


def mkimage(src: Path, image: Path) -> str:
    """Build with the real CLI; the digest is the last line it prints."""
    image.unlink(missing_ok=True)
    done = run(occlumfs_cmd("mkimage", src, image))
    lines = done.stdout.decode().strip().splitlines()
    if not lines or not lines[-1].strip().startswith("sha256:"):
        raise CommandFailed(f"mkimage printed no digest (last line: {lines[-1:]})")
    return lines[-1].strip()


def build_untimed(src: Path, image: Path) -> tuple[Path | None, str]:
    """(image, digest) of ``src``, or (None, "") when building failed (logged)."""
    log(f"building {image.name} (untimed)")
    try:
        return image, mkimage(src, image)
    except Exception as exc:
        log(f"building {image.name} FAILED: {exc}")
        return None, ""


class ImageSuite:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.root = settings.scratch / "image"
        self.images = self.root / "images"
        self.mounts: list[Subject] = []
        self.have_mkimage = occlumfs_has("mkimage")
        if self.have_mkimage:
            self.missing = None
        elif settings.stand_in:
            self.missing = "unavailable: 'occlumfs mkimage' not implemented yet (memfs stand-in)"
        else:
            self.missing = "unavailable: 'occlumfs mkimage' not implemented yet"

    # Subjects ------------------------------------------------------------------

    def build_image(self, src: Path, name: str) -> tuple[Path | None, str]:
        """An image of ``src`` for the read workloads (untimed), or (None, "") when we can't."""
        if not self.have_mkimage:
            return None, ""
        return build_untimed(src, self.images / name)

    def ours(self, tag: str, image: Path | None, digest: str, seed: Path) -> Subject:
        mnt = self.root / "mnt" / f"ours-{tag}"
        log_file = self.s.log_dir / f"image-{tag}.log"
        subject: Subject
        if image is None and self.s.stand_in and not self.have_mkimage:
            subject = MemStandIn(mnt, log_file, seed=seed)
        else:
            subject = OcclumImage(image or Path("/nonexistent"), digest, mnt, log_file)
        self.mounts.append(subject)
        return subject

    def unusable(self, subject: Subject) -> str | None:
        """Why our subject cannot be measured at all, if so."""
        if isinstance(subject, OcclumImage) and not subject.digest:
            return self.missing or "failed: building the image failed"
        return None

    def overlay(self, tag: str, lower: Path) -> FuseOverlay:
        subject = FuseOverlay(lower, self.root / "mnt" / f"overlay-{tag}")
        self.mounts.append(subject)
        return subject

    def measure_all(self, phases, ours: Subject, peers: list[Subject], reps: int) -> None:
        reason = self.unusable(ours)
        if reason:
            mark_unavailable([row for row, _ in phases], ours, reason)
        measure(phases, [ours, *peers], reps)

    # The suite -------------------------------------------------------------------

    def run(self) -> SuiteReport:
        report = SuiteReport("image", "Image layers (issue 2)")
        if self.root.exists():
            shutil.rmtree(self.root)
        self.images.mkdir(parents=True)
        try:
            self._run(report, self.root / "src")
        finally:
            teardown_all(self.mounts)
        note_server_logs(report, self.mounts, self.s.quick)
        return report

    def _run(self, report: SuiteReport, src: Path) -> None:
        size = self.s.size
        log("copying the stdlib tree")
        stdlib = src / "stdlib"
        files, nbytes = datasets.copy_stdlib(stdlib, max_files=200 if self.s.quick else None)
        log(f"generating a {format_bytes(size)} mixed tree and a {format_bytes(size)} file")
        mixed = src / "mixed"
        mfiles, mbytes = datasets.mixed_tree(mixed, size)
        seq = src / "seq"
        datasets.random_file(seq / "big.bin", size, "seq-read")
        small = src / "small"
        datasets.random_file(small / "small.bin", SMALL_IMAGE, "small-image")

        row, stdlib_digest = self.build_row(
            "image.build.stdlib",
            f"mkimage stdlib ({files:,} files, {format_bytes(nbytes)})",
            stdlib,
            self.images / "stdlib.img",
        )
        report.rows.append(row)
        row, _ = self.build_row(
            "image.build.mixed",
            f"mkimage mixed tree ({mfiles:,} files, {format_bytes(mbytes)})",
            mixed,
            self.images / "mixed.img",
        )
        report.rows.append(row)
        (self.images / "mixed.img").unlink(missing_ok=True)
        shutil.rmtree(mixed)

        seq_image, seq_digest = self.build_image(seq, "seq.img")
        report.rows.append(self.seq_read_row(seq, seq_image, seq_digest))

        if stdlib_digest:
            stdlib_image: Path | None = self.images / "stdlib.img"
        else:
            stdlib_image, stdlib_digest = self.build_image(stdlib, "stdlib.img")
        report.rows += self.tree_rows(stdlib, stdlib_image, stdlib_digest, files, nbytes)

        report.rows += self.mount_time_rows(seq_image, seq_digest, small)
        report.rows.append(self.rss_row(src))

    def build_row(self, key: str, label: str, src: Path, image: Path) -> tuple[Row, str]:
        ours, floor = Contender(OURS), Contender(TAR_FLOOR)
        row = new_row(key, label, SECONDS, ours, [floor], Target("ratio_max", 1.5))
        digests: set[str] = set()
        # The floor hashes with OpenSSL (SHA extensions, like hashlib); coreutils
        # sha256sum, the floor of earlier runs, uses neither and is shown for scale.
        sha256sum: list[float] = []

        def sample(subject: Subject) -> float:
            # Both read the tree from the page cache: the row compares the CPU and
            # write cost of building, not the disk. Read it again before every
            # sample: on a shared machine another process may have dropped the
            # caches since, and whoever ran first would read the disk for both.
            run(shell(f"tar -cf - -C '{src}' . | cat > /dev/null"))
            if subject is floor:
                if not shutil.which("openssl"):
                    raise Unavailable("unavailable: no openssl command")
                sha256sum.append(timed(shell(f"tar -cf - -C '{src}' . | sha256sum > /dev/null")))
                return timed(shell(f"tar -cf - -C '{src}' . | openssl dgst -sha256 > /dev/null"))
            if not self.have_mkimage:
                raise Unavailable(self.missing)
            image.unlink(missing_ok=True)
            run(["sync"])
            start = time.perf_counter()
            digests.add(mkimage(src, image))
            return time.perf_counter() - start

        measure([(row, sample)], [ours, floor], self.s.reps)
        if sha256sum:
            row.notes.append(
                f"for scale, not judged: tar -c | sha256sum (the floor of earlier runs) took "
                f"{format_seconds(median(sha256sum))} (median)"
            )
        if len(digests) > 1:
            row.notes.append(f"NOT reproducible: {len(digests)} different digests in one run")
        elif digests:
            row.notes.append("the same digest on every repetition")
        return row, (digests.pop() if len(digests) == 1 else "")

    def seq_read_row(self, seq: Path, image: Path | None, digest: str) -> Row:
        size = self.s.size
        ours, peer = self.ours("seq", image, digest, seq), self.overlay("seq", seq)
        row = new_row(
            "image.read.seq",
            f"cold sequential read, {format_bytes(size)} file",
            THROUGHPUT,
            ours,
            [peer],
            Target("ratio_min", 1.0),
        )
        sample = cold_read_sample("big.bin", size, self.s.drop_caches)
        self.measure_all([(row, sample)], ours, [peer], self.s.reps)
        return row

    def tree_rows(
        self, stdlib: Path, image: Path | None, digest: str, files: int, nbytes: int
    ) -> list[Row]:
        ours, peer = self.ours("stdlib", image, digest, stdlib), self.overlay("stdlib", stdlib)
        target = Target("ratio_max", 1.0)
        ls_row = new_row(
            "image.ls.stdlib",
            f"cold ls -lR stdlib ({files:,} files)",
            SECONDS,
            ours,
            [peer],
            target,
        )
        cat_row = new_row(
            "image.readall.stdlib",
            f"cold read of every stdlib file ({format_bytes(nbytes)})",
            SECONDS,
            ours,
            [peer],
            target,
        )

        ls_lr, read_all = tree_samples(".", self.s.drop_caches)
        self.measure_all([(ls_row, ls_lr), (cat_row, read_all)], ours, [peer], self.s.reps)
        return [ls_row, cat_row]

    def mount_time_rows(
        self, big_image: Path | None, big_digest: str, small_src: Path
    ) -> list[Row]:
        """Opening must not grow with the image: the whole mount command, then the library call.

        The command's fixed cost (interpreter start, imports, FUSE init) dilutes
        the ratio, so the second row times ``open_image_fs`` alone in a fresh process.
        """
        small_name = f"{OURS}, 10 MiB image"
        target = Target("ratio_max", 1.2)
        size = format_bytes(self.s.size)
        mount_row = Row(
            "image.mount.time",
            f"mount time, {size} image vs 10 MiB image",
            SECONDS,
            Result(OURS),
            [Result(small_name)],
            target,
        )
        open_row = Row(
            "image.open.time",
            f"open_image_fs time, {size} vs 10 MiB image",
            SECONDS,
            Result(OURS),
            [Result(small_name)],
            target,
        )
        rows = [mount_row, open_row]
        small_image, small_digest = (None, "")
        if big_digest:
            small_image, small_digest = self.build_image(small_src, "small.img")
        big = self.ours("mount-big", big_image, big_digest, small_src)
        small = self.ours("mount-small", small_image, small_digest, small_src)
        small.name = small_name
        for subject in (big, small):
            reason = self.unusable(subject) or (
                "unavailable: needs real images" if isinstance(subject, MemStandIn) else None
            )
            if reason:
                mark_unavailable(rows, subject, reason)

        def mount_seconds(subject: Subject) -> float:
            self.s.drop_caches()
            start = time.perf_counter()
            subject.mount()
            elapsed = time.perf_counter() - start
            subject.unmount()
            return elapsed

        def open_seconds(subject: Subject) -> float:
            assert isinstance(subject, OcclumImage)
            self.s.drop_caches()
            done = run([sys.executable, "-c", OPEN_TIMER, str(subject.image), subject.digest])
            return float(done.stdout.decode().split()[-1])

        # Opening is quick: a few more repetitions steady the median.
        measure(
            [(mount_row, mount_seconds), (open_row, open_seconds)],
            [big, small],
            max(self.s.reps, 5),
        )
        mount_row.notes.append(
            "wall time of `occlumfs mount --digest` until it returns, CLI "
            "start included, caches dropped before each"
        )
        open_row.notes.append(
            "`open_image_fs(image, digest=...)` alone, in a fresh process "
            "(imports untimed), caches dropped before each"
        )
        return rows

    def rss_row(self, src: Path) -> Row:
        huge = 2 * self.s.size
        nfiles = 2_000 if self.s.quick else 100_000
        rss_src = src / "rss"
        log(f"generating the memory workload: a {format_bytes(huge)} file, {nfiles:,} files")
        datasets.random_file(rss_src / "huge.bin", huge, "rss-huge")
        datasets.many_files_tree(rss_src / "tree", nfiles)
        image, digest = self.build_image(rss_src, "rss.img")
        ours, peer = self.ours("rss", image, digest, rss_src), self.overlay("rss", rss_src)
        row = new_row(
            "image.rss",
            f"server peak RSS: read {format_bytes(huge)} file, ls -lR {nfiles:,} files",
            MEGABYTES,
            ours,
            [peer],
            Target("value_max", 150, MEGABYTES),
        )
        if isinstance(ours, MemStandIn):
            mark_unavailable([row], ours, "unavailable: the memfs stand-in holds data in RAM")

        def sample(subject: Subject) -> float:
            subject.peak_rss_mb = None
            with subject.mounted(self.s.drop_caches) as m:
                run(shell(f"cat '{m}/huge.bin' > /dev/null"))
                run(shell(f"ls -lR '{m}/tree' > /dev/null"))
            if subject.peak_rss_mb is None:
                raise CommandFailed("could not read the server's VmHWM")
            return subject.peak_rss_mb

        # A high-water mark is a maximum, not a timing: one pass is the measurement.
        self.measure_all([(row, sample)], ours, [peer], 1)
        row.notes.append("VmHWM of the server process over one mount (one pass)")
        shutil.rmtree(rss_src)
        if image is not None:
            image.unlink(missing_ok=True)
        return row


def run_image_suite(settings: Settings) -> SuiteReport:
    return ImageSuite(settings).run()
