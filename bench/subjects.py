"""The filesystems under test: ours and the peers, each mountable and unmountable on demand.

A subject knows how to create its backing store once, mount it, find its
server process and unmount it again. Cold-cache runs remount between
samples, because a FUSE server's own caches are warm caches too. Every mount
is undone on the way out, with a lazy unmount when the polite one fails.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.report import OURS
from bench.system import (
    CommandFailed,
    Unavailable,
    force_unmount,
    is_mounted,
    log,
    peak_rss_mb,
    pid_serving,
    run,
    wait_for_exit,
    wait_until_mounted,
)

SERVER_EXIT_SECONDS = 60.0


def occlumfs_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "occlumfs", *map(str, args)]


def occlumfs_has(*command: str) -> bool:
    """Whether this checkout's CLI has a (sub)command yet; peers land it concurrently."""
    done = subprocess.run(occlumfs_cmd(*command, "--help"), capture_output=True, check=False)
    return done.returncode == 0


def _fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"


def unmount_politely(mnt: Path, cmd: list[str]) -> None:
    """Run an unmount command, retrying briefly while the kernel still says busy."""
    for _ in range(50):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return
        if "busy" not in done.stderr.lower():
            break
        time.sleep(0.1)
    lines = done.stderr.strip().splitlines()
    raise CommandFailed(f"unmounting {mnt} failed: {lines[-1] if lines else done.returncode}")


class PeakWatcher:
    """Samples a process's VmHWM from a thread until stopped or the process is gone."""

    def __init__(self, pid: int | None, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak = peak_rss_mb(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if pid is not None:
            self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            value = peak_rss_mb(self.pid)
            if value is None:
                return
            self.peak = max(self.peak or 0.0, value)

    def stop(self) -> float | None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.peak


class Subject:
    """One filesystem at one mountpoint."""

    name: str = "?"
    program: str = "?"  # the server's argv[0] basename, to find its pid
    persistent: bool = True  # content survives an unmount

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.peak_rss_mb: float | None = None
        self.last_peak_rss_mb: float | None = None  # of the latest mount alone
        self.mounts = 0
        self._is_set_up = False

    # What each subject provides ------------------------------------------------

    def check(self) -> None:
        """Raise Unavailable with a reason when this subject cannot run here."""
        if not shutil.which(self.program):
            raise Unavailable(f"unavailable: {self.program} not installed")

    def _create(self) -> None:
        """Create the backing store (once per run)."""

    def backing_store(self) -> Path | None:
        """The directory holding the backing store, for :meth:`recreate`."""
        return None

    def _mount(self) -> None:
        raise NotImplementedError

    def _unmount(self) -> None:
        unmount_politely(self.mnt, [_fusermount(), "-u", str(self.mnt)])

    def server_pid(self) -> int | None:
        return pid_serving(self.mnt, self.program)

    # Shared life cycle -------------------------------------------------------

    def setup(self) -> None:
        if not self._is_set_up:
            self.check()
            self._create()
            self._is_set_up = True

    def recreate(self) -> None:
        """Start over from an empty backing store (the subject must be unmounted)."""
        store = self.backing_store()
        if store is None:
            raise CommandFailed(f"{self.name} has no backing store to recreate")
        shutil.rmtree(store, ignore_errors=True)
        self._is_set_up = False
        self.setup()

    def mount(self) -> None:
        self.setup()
        self.mnt.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mnt):
            raise CommandFailed(f"{self.mnt} is still mounted from an earlier step")
        try:
            self._mount()
            wait_until_mounted(self.mnt)
        except BaseException:
            if is_mounted(self.mnt):  # half-made: mounted, but the command failed
                self.unmount(quiet=True)
            raise
        self.mounts += 1

    def unmount(self, *, quiet: bool = False) -> None:
        pid = self.server_pid()
        # Unmounting makes a server flush and commit: keep sampling its
        # high-water mark until it exits, so that memory counts too.
        watcher = PeakWatcher(pid)
        try:
            self._unmount()
            if pid is not None and not wait_for_exit(pid, SERVER_EXIT_SECONDS):
                raise CommandFailed(f"{self.name} server {pid} still running after unmount")
        except Exception:
            force_unmount(self.mnt)
            if not quiet:
                raise
        finally:
            peak = self.last_peak_rss_mb = watcher.stop()
            if peak is not None:
                self.peak_rss_mb = max(self.peak_rss_mb or 0.0, peak)
            if is_mounted(self.mnt):
                force_unmount(self.mnt)

    @contextlib.contextmanager
    def mounted(self, drop_caches: Callable[[], None] | None = None) -> Iterator[Path]:
        """Mount for the duration of the block; with ``drop_caches``, start cold."""
        self.mount()
        try:
            if drop_caches is not None:
                drop_caches()
            yield self.mnt
        except BaseException:
            self.unmount(quiet=True)
            raise
        self.unmount()


class Contender(Subject):
    """Something measured beside the filesystems that mounts nothing (a build floor)."""

    def __init__(self, name: str) -> None:
        super().__init__(Path("/nonexistent"))
        self.name = name

    def check(self) -> None:
        return


# Ours ---------------------------------------------------------------------------


class OcclumfsSubject(Subject):
    """Served by ``occlumfs mount``; the pid comes from the mount record."""

    program = "python"
    name = OURS

    def __init__(self, mnt: Path, log_file: Path) -> None:
        super().__init__(mnt)
        self.log_file = log_file

    def check(self) -> None:  # the interpreter running us runs the server too
        return

    def _mount_args(self) -> list[str | Path]:
        raise NotImplementedError

    def _mount(self) -> None:
        run(occlumfs_cmd("mount", *self._mount_args(), self.mnt, "--log-file", self.log_file))

    def _unmount(self) -> None:
        unmount_politely(self.mnt, occlumfs_cmd("umount", self.mnt))

    def server_pid(self) -> int | None:
        from occlumfs.mount import _record_path

        record = _record_path(self.mnt.resolve())
        # The server writes its record just after the mount command returns.
        for _ in range(100):
            with contextlib.suppress(OSError, ValueError, KeyError):
                return int(json.loads(record.read_text())["pid"])
            if not is_mounted(self.mnt):
                return None
            time.sleep(0.02)
        return None

    def log_problems(self) -> list[str]:
        """ERROR lines and tracebacks from the server log: a benchmark must not hide them."""
        if not self.log_file.exists():
            return []
        lines = self.log_file.read_text(errors="replace").splitlines()
        return [line for line in lines if " ERROR" in line or line.startswith("Traceback")]


class OcclumImage(OcclumfsSubject):
    def __init__(self, image: Path, digest: str, mnt: Path, log_file: Path) -> None:
        super().__init__(mnt, log_file)
        self.image, self.digest = image, digest

    def _mount_args(self) -> list[str | Path]:
        return ["-t", "image", self.image, "--digest", self.digest]


class OcclumSefs(OcclumfsSubject):
    def __init__(self, store: Path, key_file: Path, mnt: Path, log_file: Path) -> None:
        super().__init__(mnt, log_file)
        self.store, self.key_file = store, key_file

    def check(self) -> None:
        if not occlumfs_has("sefs", "create"):
            raise Unavailable("unavailable: 'occlumfs sefs create' is not implemented yet")

    def _create(self) -> None:
        if not self.key_file.exists():
            run(occlumfs_cmd("keygen", self.key_file))
        self.store.mkdir(parents=True, exist_ok=True)
        run(occlumfs_cmd("sefs", "create", self.store, "--key-file", self.key_file))

    def _mount_args(self) -> list[str | Path]:
        return ["-t", "sefs", self.store, "--key-file", self.key_file]

    def backing_store(self) -> Path:
        return self.store


class MemStandIn(OcclumfsSubject):
    """``occlumfs mount -t mem``: exercises the harness before the real subject lands.

    Nothing survives an unmount, so a "cold" run only drops kernel caches; the
    server loads the seed tree (for read workloads) itself, as part of mounting.
    """

    name = f"{OURS} (memfs stand-in)"
    persistent = False

    def __init__(self, mnt: Path, log_file: Path, seed: Path | None = None) -> None:
        super().__init__(mnt, log_file)
        self.seed = seed

    def _mount_args(self) -> list[str | Path]:
        # A SOURCE that does not exist gives an empty filesystem.
        return ["-t", "mem", self.seed or self.mnt.with_name(self.mnt.name + ".empty")]


# Peers ----------------------------------------------------------------------------


class FuseOverlay(Subject):
    """fuse-overlayfs with a lower directory only: a read-only overlay of plain ext4."""

    name = program = "fuse-overlayfs"

    def __init__(self, lower: Path, mnt: Path) -> None:
        super().__init__(mnt)
        self.lower = lower

    def _mount(self) -> None:
        run(["fuse-overlayfs", "-o", f"lowerdir={self.lower}", str(self.mnt)])


class Gocryptfs(Subject):
    name = program = "gocryptfs"

    def __init__(self, cipher: Path, mnt: Path, passfile: Path) -> None:
        super().__init__(mnt)
        self.cipher, self.passfile = cipher, passfile

    def _create(self) -> None:
        self.cipher.mkdir(parents=True, exist_ok=True)
        # scrypt cost only slows mounting; the data path does not depend on it.
        run(
            [
                "gocryptfs",
                "-q",
                "-init",
                "-scryptn",
                "10",
                "-passfile",
                str(self.passfile),
                str(self.cipher),
            ]
        )

    def _mount(self) -> None:
        run(["gocryptfs", "-q", "-passfile", str(self.passfile), str(self.cipher), str(self.mnt)])

    def backing_store(self) -> Path:
        return self.cipher


class Securefs(Subject):
    name = program = "securefs"

    def __init__(self, store: Path, mnt: Path, password: str) -> None:
        super().__init__(mnt)
        self.store, self.password = store, password

    def _create(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        # Format left at the package default; the password hash is made cheap
        # because it only costs at mount time, which is not measured.
        run(
            [
                "securefs",
                "create",
                "--pbkdf",
                "pkcs5-pbkdf2-hmac-sha256",
                "--rounds",
                "1000",
                "--pass",
                self.password,
                str(self.store),
            ]
        )

    def _mount(self) -> None:
        run(["securefs", "mount", "-b", "--pass", self.password, str(self.store), str(self.mnt)])

    def backing_store(self) -> Path:
        return self.store


def teardown_all(subjects: list[Subject]) -> None:
    """Whatever happened, leave nothing mounted."""
    for subject in subjects:
        if is_mounted(subject.mnt):
            log(f"cleaning up a leftover mount at {subject.mnt}")
            subject.unmount(quiet=True)
