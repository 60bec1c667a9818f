"""The host side of benchmarking: commands, clocks, caches, mounts and process memory."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.stats import GiB
from occlumfs.mount import process_alive, wait_for_exit  # noqa: F401 (bench.subjects uses it)


class Unavailable(Exception):
    """A subject cannot be measured on this machine (missing tool, feature not built yet)."""


class CommandFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run(
    cmd: list[str], *, timeout: float = 1800, cwd: Path | None = None, input: bytes | None = None
) -> subprocess.CompletedProcess:
    """Run a command to completion; a non-zero exit raises with its last stderr line."""
    done = subprocess.run(
        cmd, capture_output=True, timeout=timeout, cwd=cwd, input=input, check=False
    )
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        reason = err[-1] if err else f"exit status {done.returncode}"
        raise CommandFailed(f"{' '.join(map(str, cmd[:3]))} …: {reason}")
    return done


def timed(cmd: list[str], **kwargs) -> float:
    """Wall-clock seconds of one command run."""
    start = time.perf_counter()
    run(cmd, **kwargs)
    return time.perf_counter() - start


def shell(script: str) -> list[str]:
    """A bash pipeline that fails when any stage fails."""
    return ["bash", "-o", "pipefail", "-c", script]


class CacheDropper:
    """Empties the kernel page, dentry and inode caches so the next read hits the disk.

    Needs root. When it cannot, it says so once and the run is labelled warm.
    """

    def __init__(self) -> None:
        self.works = os.access("/proc/sys/vm/drop_caches", os.W_OK)
        if not self.works:
            log("cannot write /proc/sys/vm/drop_caches (not root?): 'cold' runs are warm")

    def __call__(self) -> None:
        os.sync()
        if self.works:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")


def mounted_paths() -> set[str]:
    from occlumfs.mount import mounted_paths as mounted

    return {str(path) for path in mounted()}


def is_mounted(path: Path) -> bool:
    return str(path.resolve()) in mounted_paths()


def wait_until_mounted(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if time.monotonic() > deadline:
            raise CommandFailed(f"{path} did not appear as a mount within {timeout:.0f}s")
        time.sleep(0.02)


def force_unmount(path: Path) -> None:
    """Last resort: lazily detach a mount so the run can carry on and clean up."""
    if not is_mounted(path):
        return
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    subprocess.run([fusermount, "-uz", str(path)], capture_output=True, check=False)
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def pid_serving(mountpoint: Path, program: str) -> int | None:
    """The live process named ``program`` whose command line names ``mountpoint``.

    Daemonizing peers (gocryptfs, securefs, fuse-overlayfs) do not report their
    pid, but each keeps the mountpoint in its argv.
    """
    target = os.fsencode(str(mountpoint.resolve()))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != os.fsencode(program):
            continue
        if target in argv and process_alive(int(entry)):
            return int(entry)
    return None


def peak_rss_mb(pid: int | None) -> float | None:
    """VmHWM (the resident-set high-water mark) of a live process, in MB (10^6 bytes)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1_000_000
    except OSError:
        return None
    return None


def filesystem_type(path: Path) -> str:
    done = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def machine() -> dict:
    """What a reader needs to weigh the numbers: cores, memory, kernel, disk."""
    info: dict = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) * 1024 / GiB, 1)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


def disk_of(path: Path) -> str:
    """Block device, filesystem type and (when the kernel says) rotational or not."""
    done = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    source_fstype = done.stdout.split()
    if len(source_fstype) != 2:
        return filesystem_type(path)
    source, fstype = source_fstype
    kind = ""
    dev = os.path.basename(source)
    with contextlib.suppress(OSError):
        rotational = Path(f"/sys/block/{dev}/queue/rotational").read_text().strip()
        kind = ", rotational" if rotational == "1" else ", non-rotational"
    return f"{source} ({fstype}{kind})"


def package_version(package: str) -> str:
    """The Debian package version of a peer (their own --version output is not uniform)."""
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else "not installed"


def git_commit(repo: Path) -> str:
    """The commit measured; "+dirty" when the code under test has uncommitted changes.

    A snapshot made with ``git archive`` has no .git: it carries its commit in
    a ``.git-commit`` file instead (see docs/performance.md).
    """
    done = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    commit = done.stdout.strip()
    if done.returncode != 0 or not commit:
        marker = repo / ".git-commit"
        return marker.read_text().strip()[:7] if marker.exists() else "unknown"
    status = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", "occlumfs", "libos"],
        capture_output=True,
        text=True,
        check=False,
    )
    return commit + ("+dirty" if status.stdout.strip() else "")
