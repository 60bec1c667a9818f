"""Union workloads (issue 8): image layers below, a SEFS store above, against their peers.

* chmod of a large lower file: a metadata-only copy-up (a value target; a
  fresh upper every repetition so each one copies up); fuse-overlayfs over
  the same file as a plain directory is shown beside it.
* untar of the stdlib into the union vs into SEFS alone.
* cold ``ls -lR`` and cold read of every file of a merged tree (the stdlib
  below, the same edits made above through each mount) vs fuse-overlayfs
  over the same trees as plain directories.
* cold sequential read of a large lower file vs the image mount alone.
* server peak RSS over a 100,000-file lower (``ls -lR`` of it all).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from bench import datasets
from bench import measure as bm
from bench.image_suite import build_untimed
from bench.report import Row, SuiteReport
from bench.stats import (
    MEGABYTES,
    SECONDS,
    THROUGHPUT,
    Target,
    format_bytes,
)
from bench.subjects import (
    OcclumfsSubject,
    OcclumImage,
    OcclumSefs,
    Subject,
    occlumfs_cmd,
    occlumfs_has,
    teardown_all,
)
from bench.system import CommandFailed, Unavailable, log, run, shell, timed

TREE = "stdlib"
NOWHERE = Path("/nonexistent")  # the image of a build that failed: mounting it fails


class OcclumUnion(OcclumfsSubject):
    """``occlumfs mount --lower IMG --digest D --upper DIR``; ``reset`` starts a new upper."""

    def __init__(self, image: Path, digest: str, upper: Path, key: Path, mnt: Path, log_file):
        super().__init__(mnt, log_file)
        self.image, self.digest, self.upper, self.key = image, digest, upper, key

    def check(self) -> None:
        if not self.digest:
            raise Unavailable("failed: building the lower image failed")

    def _create(self) -> None:
        if not self.key.exists():
            run(occlumfs_cmd("keygen", self.key))

    def _mount_args(self) -> list[str | Path]:
        # A missing upper becomes a new SEFS store under the key (the mount says so).
        return [
            *("--lower", self.image, "--digest", self.digest),
            *("--upper", self.upper, "--key-file", self.key),
        ]

    def reset(self) -> None:
        shutil.rmtree(self.upper, ignore_errors=True)

    def upper_bytes(self) -> int:
        return datasets.tree_stats(self.upper)[1] if self.upper.exists() else 0


class OverlayRW(Subject):
    """fuse-overlayfs with a plain lower directory and a plain upper directory."""

    name = program = "fuse-overlayfs"

    def __init__(self, lower: Path, state: Path, mnt: Path) -> None:
        super().__init__(mnt)
        self.lower, self.upper, self.work = lower, state / "upper", state / "work"

    def reset(self) -> None:
        for d in (self.upper, self.work):
            shutil.rmtree(d, ignore_errors=True)

    def _mount(self) -> None:
        for d in (self.upper, self.work):
            d.mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        run(["fuse-overlayfs", "-o", opts, str(self.mnt)])

    def upper_bytes(self) -> int:
        return datasets.tree_stats(self.upper)[1] if self.upper.exists() else 0


def edit_tree(top: Path) -> int:
    """The edits "above" the stdlib, made the same way through each mount; how many."""
    files = sorted(p for p in top.rglob("*") if p.is_file())
    edits = 0
    for i, path in enumerate(files):
        if i % 10 == 0:
            with open(path, "ab") as f:  # a copy-up of the data
                f.write(b"# edited\n")
        elif i % 10 == 5:
            path.unlink()  # a whiteout
        elif i % 10 == 7:
            path.chmod(0o600)  # a metadata-only copy-up
        else:
            continue
        edits += 1
    added = top / "added"
    for d in range(5):
        (added / f"d{d}").mkdir(parents=True)
        for k in range(20):
            (added / f"d{d}" / f"new{k}.txt").write_bytes(b"new file %d\n" % k * (1 + k))
            edits += 1
    return edits


class UnionSuite:
    def __init__(self, settings: bm.Settings) -> None:
        self.s = settings
        self.root = settings.scratch / "union"
        self.key = self.root / "union.key"
        self.mounts: list[Subject] = []

    def union(self, tag: str, image: Path | None, digest: str) -> OcclumUnion:
        (self.root / "uppers").mkdir(exist_ok=True)
        subject = OcclumUnion(
            image or NOWHERE,
            digest,
            self.root / "uppers" / tag,
            self.key,
            self.root / "mnt" / f"union-{tag}",
            self.s.log_dir / f"union-{tag}.log",
        )
        self.mounts.append(subject)
        return subject

    def peer(self, name: str, subject: Subject) -> Subject:
        subject.name = name
        self.mounts.append(subject)
        return subject

    def overlay(self, tag: str, lower: Path) -> OverlayRW:
        subject = OverlayRW(lower, self.root / "overlay" / tag, self.root / "mnt" / f"ovl-{tag}")
        self.mounts.append(subject)
        return subject

    def image(self, src: Path, name: str) -> tuple[Path | None, str]:
        return build_untimed(src, self.root / "images" / name)

    def run(self) -> SuiteReport:
        report = SuiteReport("union", "Union of image layers and SEFS (issue 8)")
        if self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "images").mkdir(parents=True)
        try:
            if not occlumfs_has("mkimage"):
                raise Unavailable("unavailable: 'occlumfs mkimage' is not implemented")
            self._run(report)
        finally:
            teardown_all(self.mounts)
        bm.note_server_logs(report, self.mounts, self.s.quick)
        return report

    def _run(self, report: SuiteReport) -> None:
        src = self.root / "src"
        size = self.s.size
        log(f"generating a {format_bytes(size)} file and copying the stdlib tree")
        datasets.random_file(src / "seq" / "big.bin", size, "union-seq")
        files, nbytes = datasets.copy_stdlib(
            src / "stdlib" / TREE, max_files=200 if self.s.quick else None
        )
        seq_image, seq_digest = self.image(src / "seq", "seq.img")
        report.rows.append(self.chmod_row(src / "seq", seq_image, seq_digest))
        report.rows.append(self.seq_read_row(src / "seq", seq_image, seq_digest))
        stdlib_image, stdlib_digest = self.image(src / "stdlib", "stdlib.img")
        report.rows.append(self.untar_row(src / "stdlib", stdlib_image, stdlib_digest, files))
        report.rows += self.tree_rows(src / "stdlib", stdlib_image, stdlib_digest, files, nbytes)
        report.rows.append(self.rss_row(src))

    def chmod_row(self, seq: Path, image: Path | None, digest: str) -> Row:
        ours, peer = self.union("chmod", image, digest), self.overlay("chmod", seq)
        row = bm.new_row(
            "union.chmod",
            f"chmod of a {format_bytes(self.s.size)} lower file (new upper each time)",
            SECONDS,
            ours,
            [peer],
            Target("value_max", 0.050, SECONDS),
        )
        grew: dict[str, int] = {}

        def sample(subject: Subject) -> float:
            assert isinstance(subject, OcclumUnion | OverlayRW)
            subject.reset()
            with subject.mounted(self.s.drop_caches) as m:
                before = subject.upper_bytes()
                start = time.perf_counter()
                os.chmod(m / "big.bin", 0o600)
                elapsed = time.perf_counter() - start
                if os.stat(m / "big.bin").st_mode & 0o777 != 0o600:
                    raise CommandFailed("the mode did not change")
            grew[subject.name] = max(grew.get(subject.name, 0), subject.upper_bytes() - before)
            return elapsed

        bm.measure([(row, sample)], [ours, peer], self.s.reps)
        row.notes.append(
            "the upper grew by at most: "
            + ", ".join(f"{name} {format_bytes(n)}" for name, n in grew.items())
        )
        return row

    def seq_read_row(self, seq: Path, image: Path | None, digest: str) -> Row:
        size = self.s.size
        ours = self.union("seq", image, digest)
        mnt, log_file = self.root / "mnt" / "image-seq", self.s.log_dir / "union-image-seq.log"
        peer = self.peer("image mount alone", OcclumImage(image or NOWHERE, digest, mnt, log_file))
        row = bm.new_row(
            "union.read.seq",
            f"cold sequential read, {format_bytes(size)} lower file",
            THROUGHPUT,
            ours,
            [peer],
            Target("ratio_min", 0.9),
        )
        sample = bm.cold_read_sample("big.bin", size, self.s.drop_caches)
        if not digest:
            bm.mark_unavailable([row], peer, "failed: building the image failed")
        bm.measure([(row, sample)], [ours, peer], self.s.reps)
        return row

    def untar_row(self, stdlib: Path, image: Path | None, digest: str, files: int) -> Row:
        tarball = self.root / "stdlib.tar"
        datasets.make_tarball(stdlib / TREE, tarball)
        ours = self.union("untar", image, digest)
        mnt, log_file = self.root / "mnt" / "sefs", self.s.log_dir / "union-sefs.log"
        peer = self.peer(
            "SEFS alone", OcclumSefs(self.root / "sefs-store", self.key, mnt, log_file)
        )
        row = bm.new_row(
            "union.untar",
            f"untar stdlib ({files:,} files) into a new directory",
            SECONDS,
            ours,
            [peer],
            Target("ratio_max", 1.2),
        )
        run(shell(f"cat '{tarball}' > /dev/null"))

        def sample(subject: Subject) -> float:
            with subject.mounted() as m:
                if (m / "untarred").exists():
                    run(["rm", "-rf", str(m / "untarred")])
                (m / "untarred").mkdir()
                run(["sync"])
                return timed(["tar", "-xf", str(tarball), "-C", str(m / "untarred")])

        ours.setup()  # the key file, which SEFS alone shares
        bm.measure([(row, sample)], [ours, peer], self.s.reps)
        return row

    def tree_rows(
        self, stdlib: Path, image: Path | None, digest: str, files: int, nbytes: int
    ) -> list[Row]:
        ours, peer = self.union("tree", image, digest), self.overlay("tree", stdlib)
        target = Target("ratio_max", 1.0)
        ls_row = bm.new_row(
            "union.ls",
            f"cold ls -lR, stdlib ({files:,} files) + edits",
            SECONDS,
            ours,
            [peer],
            target,
        )
        cat_row = bm.new_row(
            "union.readall",
            f"cold read of every file, stdlib ({format_bytes(nbytes)}) + edits",
            SECONDS,
            ours,
            [peer],
            target,
        )
        edits = 0
        for subject in (ours, peer):
            try:
                with subject.mounted() as m:
                    edits = edit_tree(m / TREE)
            except Exception as exc:
                reason = exc.args[0] if isinstance(exc, Unavailable) else f"failed: {exc}"
                bm.mark_unavailable([ls_row, cat_row], subject, reason)

        ls_lr, read_all = bm.tree_samples(TREE, self.s.drop_caches)
        bm.measure([(ls_row, ls_lr), (cat_row, read_all)], [ours, peer], self.s.reps)
        for row in (ls_row, cat_row):
            row.notes.append(f"{edits} edits made through each mount first (untimed)")
        return [ls_row, cat_row]

    def rss_row(self, src: Path) -> Row:
        nfiles = 2_000 if self.s.quick else 100_000
        log(f"generating the memory workload: {nfiles:,} files")
        datasets.many_files_tree(src / "many" / "tree", nfiles)
        image, digest = self.image(src / "many", "many.img")
        ours, peer = self.union("rss", image, digest), self.overlay("rss", src / "many")
        row = bm.new_row(
            "union.rss",
            f"server peak RSS: ls -lR and stat of a {nfiles:,}-file lower",
            MEGABYTES,
            ours,
            [peer],
            Target("value_max", 200, MEGABYTES),
        )

        def sample(subject: Subject) -> float:
            subject.peak_rss_mb = None
            with subject.mounted(self.s.drop_caches) as m:
                run(shell(f"ls -lR '{m}/tree' > /dev/null"))
            if subject.peak_rss_mb is None:
                raise CommandFailed("could not read the server's VmHWM")
            return subject.peak_rss_mb

        bm.measure([(row, sample)], [ours, peer], 1)
        row.notes.append("VmHWM of the server process over one mount (one pass)")
        return row


def run_union_suite(settings: bm.Settings) -> SuiteReport:
    return UnionSuite(settings).run()
