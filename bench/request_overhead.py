"""Per-request cost of our FUSE server: wall time per request and server CPU per request.

    python bench/request_overhead.py [--files 20000] [--subjects mem,image,sefs]

Mounts each subject through the ``occlumfs`` command, as a user would (a
background server), then times small requests that each reach the server
exactly once:

- ``stat``: ``os.stat`` of distinct names never looked up before (one LOOKUP each);
- ``readdir``: ``os.scandir`` + ``entry.stat()`` over every directory, right
  after a remount (READDIRPLUS; cost given per entry);
- ``pread 4K``: ``os.preadv`` of 4 KiB at random aligned offsets of a 64 MiB
  file opened with O_DIRECT, so the page cache never answers (one READ each);
- ``seq read``: a cold sequential read of that file in 1 MiB calls (MB/s, and
  the server's CPU per MiB).

Server CPU is utime+stime of the server (pid from the mount record), read from
/proc/<pid>/stat before and after. Run as root (cache drops, FUSE mounts).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from occlumfs.mount import mount_record  # noqa: E402

OCCLUMFS = [sys.executable, "-m", "occlumfs"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
BIG_FILE_SIZE = 64 << 20
FILES_PER_DIR = 1000


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        print("warning: cannot drop caches (not root?)", file=sys.stderr)


def server_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def make_source(root: Path, nfiles: int) -> None:
    rng = random.Random(1)
    for i in range(nfiles):
        d = root / f"d{i // FILES_PER_DIR:03d}"
        if i % FILES_PER_DIR == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06d}").write_bytes(b"x" * rng.randrange(0, 300))
    with open(root / "big", "wb") as f:
        f.write(rng.randbytes(BIG_FILE_SIZE))


class Subject:
    def __init__(self, name: str, mount_args: list[str], mnt: Path, populate: bool) -> None:
        self.name = name
        self.mount_args = mount_args
        self.mnt = mnt
        self.populate = populate

    def mount(self) -> int:
        subprocess.run([*OCCLUMFS, "mount", *self.mount_args, str(self.mnt)], check=True)
        record = mount_record(self.mnt)
        assert record is not None, f"no mount record for {self.mnt}"
        return int(record["pid"])

    def umount(self) -> None:
        subprocess.run([*OCCLUMFS, "umount", str(self.mnt)], check=True)

    def remount_cold(self) -> int:
        self.umount()
        drop_caches()
        pid = self.mount()
        drop_caches()
        return pid


class Meter:
    """Wall time and server CPU over a block of ``count`` requests."""

    def __init__(self, pid: int, count: int) -> None:
        self.pid = pid
        self.count = count

    def __enter__(self) -> Meter:
        self.cpu0 = server_cpu_seconds(self.pid)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = server_cpu_seconds(self.pid) - self.cpu0

    def line(self, what: str, unit: str = "request") -> str:
        return (
            f"  {what:<34} {self.wall / self.count * 1e6:8.1f} us/{unit}"
            f"   server CPU {self.cpu / self.count * 1e6:8.1f} us/{unit}"
            f"   ({self.count} in {self.wall:.2f} s)"
        )


def names(nfiles: int) -> list[str]:
    return [f"d{i // FILES_PER_DIR:03d}/f{i:06d}" for i in range(nfiles)]


def run_subject(subject: Subject, nfiles: int, nreads: int) -> None:
    print(f"{subject.name}:")
    pid = subject.mount()
    try:
        if subject.populate:
            # A SEFS starts empty: lay the tree down through the mount.
            make_source(subject.mnt, nfiles)
            pid = subject.remount_cold()
        else:
            drop_caches()
        mnt = subject.mnt
        # Warm the directories themselves, so each stat below is one LOOKUP.
        for d in {n.split("/")[0] for n in names(nfiles)}:
            os.stat(mnt / d)
        paths = [str(mnt / n) for n in names(nfiles)]
        random.Random(2).shuffle(paths)
        with Meter(pid, nfiles) as m:
            for p in paths:
                os.stat(p)
        print(m.line("stat, cold names (LOOKUP)"))

        pid = subject.remount_cold()
        dirs = sorted(d for d in os.listdir(mnt) if d.startswith("d"))
        entries = 0
        with Meter(pid, 1) as m:
            for d in dirs:
                with os.scandir(mnt / d) as it:
                    for e in it:
                        e.stat(follow_symlinks=False)
                        entries += 1
        m.count = entries
        print(m.line("scandir+stat (READDIRPLUS)", "entry"))

        fd = os.open(mnt / "big", os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            rng = random.Random(3)
            offsets = [rng.randrange(BIG_FILE_SIZE // 4096) * 4096 for _ in range(nreads)]
            with Meter(pid, nreads) as m:
                for off in offsets:
                    os.preadv(fd, [buf], off)
            print(m.line("pread 4 KiB O_DIRECT (READ)"))
        finally:
            os.close(fd)

        pid = subject.remount_cold()
        mib = BIG_FILE_SIZE >> 20
        with Meter(pid, mib) as m, open(mnt / "big", "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        print(m.line("cold sequential read, 1 MiB calls", "MiB") + f"  {mib / m.wall:.0f} MiB/s")
    finally:
        subject.umount()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20000, help="small files (stat, readdir)")
    parser.add_argument("--reads", type=int, default=20000, help="4 KiB O_DIRECT reads")
    parser.add_argument("--subjects", default="mem,image,sefs")
    parser.add_argument("--scratch", default="/var/tmp", help="where inputs and mounts go")
    args = parser.parse_args(argv)
    wanted = args.subjects.split(",")

    work = Path(tempfile.mkdtemp(prefix="occlumfs-reqbench.", dir=args.scratch))
    try:
        src = work / "src"
        src.mkdir()
        make_source(src, args.files)
        subjects = []
        if "mem" in wanted:
            (work / "mnt-mem").mkdir()
            subjects.append(Subject("mem", ["-t", "mem", str(src)], work / "mnt-mem", False))
        if "image" in wanted:
            img = work / "img"
            out = subprocess.run(
                [*OCCLUMFS, "mkimage", str(src), str(img)],
                check=True,
                capture_output=True,
                text=True,
            )
            digest = out.stdout.split()[-1]
            (work / "mnt-img").mkdir()
            subjects.append(
                Subject("image", [str(img), "--digest", digest], work / "mnt-img", False)
            )
        if "sefs" in wanted:
            key = work / "key"
            store = work / "sefs"
            state = work / "sefs-state"
            subprocess.run([*OCCLUMFS, "keygen", str(key)], check=True, capture_output=True)
            subprocess.run(
                [
                    *OCCLUMFS,
                    "sefs",
                    "create",
                    "--key-file",
                    str(key),
                    "--state-dir",
                    str(state),
                    str(store),
                ],
                check=True,
                capture_output=True,
            )
            (work / "mnt-sefs").mkdir()
            args_sefs = ["--key-file", str(key), "--state-dir", str(state), str(store)]
            subjects.append(Subject("sefs", args_sefs, work / "mnt-sefs", True))
        print(f"python {sys.version.split()[0]}, {args.files} files, {args.reads} reads")
        for subject in subjects:
            run_subject(subject, args.files, args.reads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
