"""The mount command's lifecycle, on the in-memory filesystem.

Readiness is never waited for with a fixed sleep: either the command returns
once the mount is ready (background), or a bounded poll of the mount table
asserts on every round that the server is still alive (foreground).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import process_exited, run_cli

from occlumfs.errors import ExitCode
from occlumfs.mount import mount_record, mounted_paths

pytestmark = pytest.mark.fuse

OCCLUMFS = [sys.executable, "-m", "occlumfs"]
READY_SECONDS = 30


def _is_mounted(mnt: Path) -> bool:
    # No lookup of mnt itself: that would ask its server, which may be stopped.
    return Path(os.path.abspath(mnt)) in mounted_paths()


def _wait_until_mounted(mnt: Path, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while not _is_mounted(mnt):
        assert server.poll() is None, f"server exited {server.returncode} before mounting"
        assert time.monotonic() < deadline, f"{mnt} not mounted after {READY_SECONDS}s"
        # A bounded wait on the server itself: it returns early if the server dies.
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=0.02)


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def mnt(tmp_path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if _is_mounted(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, check=False)


# -- background (default) --------------------------------------------------------------


def test_mount_returns_ready_and_umount_waits(mount):
    with mount("scratch", "--type", "mem") as mnt:
        (mnt / "f").write_bytes(b"data")
        assert (mnt / "f").read_bytes() == b"data"
        assert os.statvfs(mnt).f_bsize == 4096


def test_umount_returns_only_after_the_server_exited(mnt, tmp_path):
    run_cli("mount", "--type", "mem", "scratch", mnt, "--log-file", tmp_path / "log")
    record = mount_record(mnt)  # written before the mount command returned
    assert record is not None and record["mountpoint"] == str(mnt.resolve())
    pid = int(record["pid"])
    assert not process_exited(pid)
    run_cli("umount", mnt)
    assert process_exited(pid), "occlumfs umount returned while the server still ran"
    assert not _is_mounted(mnt)
    assert mount_record(mnt) is None
    assert "unmounted" in (tmp_path / "log").read_text()


def test_mount_copies_a_directory_into_memory(mount, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"copied")
    with mount(src, "--type", "mem") as mnt:
        assert (mnt / "d" / "f").read_bytes() == b"copied"
        (mnt / "d" / "f").write_bytes(b"changed in memory")
    assert (src / "d" / "f").read_bytes() == b"copied"


# The background server is orphaned when `occlumfs mount` exits, so its exit
# status is only visible to a subreaper: this helper becomes one, runs the
# mount command, then reports "PID STATUS" for every orphan it reaps.
_REAPER = """
import ctypes, os, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
print("mount", subprocess.run(sys.argv[1:]).returncode, flush=True)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    print(pid, os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_to_the_background_server_unmounts_cleanly(mnt, tmp_path, signum):
    log = tmp_path / "server.log"
    cmd = [*OCCLUMFS, "mount", "-t", "mem", "x", str(mnt), "--log-file", str(log)]
    with subprocess.Popen(
        [sys.executable, "-c", _REAPER, *cmd], stdout=subprocess.PIPE, text=True
    ) as reaper:
        try:
            assert reaper.stdout.readline().split() == ["mount", "0"]
            assert _is_mounted(mnt)
            (mnt / "f").write_bytes(b"written before the signal")
            pid = int(mount_record(mnt)["pid"])
            os.kill(pid, signum)  # at once: the server must not lose an early signal
            reaped = {}
            for line in reaper.stdout:
                child, status = map(int, line.split())
                reaped[child] = status
            assert reaped.get(pid) == 0, f"server {pid}: {reaped}\n{log.read_text()}"
            assert reaper.wait(timeout=30) == 0
        finally:
            reaper.kill()
    assert not _is_mounted(mnt)
    text = log.read_text()
    assert f"received {signal.Signals(signum).name}" in text and "unmounted" in text
    assert "ERROR" not in text and "Traceback" not in text


def test_umount_of_a_busy_mount_is_a_clear_error_and_lazy_detaches(mnt, tmp_path):
    run_cli("mount", "--type", "mem", "scratch", mnt, "--log-file", tmp_path / "log")
    pid = int(mount_record(mnt)["pid"])
    fd = os.open(mnt / "held-open", os.O_RDWR | os.O_CREAT)
    try:
        done = run_cli("umount", mnt, check=False)
        assert done.returncode == ExitCode.IN_USE
        assert "busy" in _one_line(done.stderr)
        assert _is_mounted(mnt) and not process_exited(pid)
        run_cli("umount", "--lazy", mnt)  # returns at once, though a file is open
        assert not _is_mounted(mnt)
        assert os.pwrite(fd, b"still served", 0) == 12  # the open file still works
        assert os.pread(fd, 12, 0) == b"still served"
    finally:
        os.close(fd)
    # The last close lets the server finish: wait (bounded) for it to exit.
    with contextlib.suppress(ProcessLookupError):  # already gone
        pidfd = os.pidfd_open(pid)
        try:
            select.select([pidfd], [], [], 30)
        finally:
            os.close(pidfd)
    assert process_exited(pid), "the server did not exit after the last close"
    assert "unmounted" in (tmp_path / "log").read_text()


def test_a_mount_whose_server_died_is_reported_and_umount_clears_it(mnt, tmp_path):
    run_cli("mount", "--type", "mem", "scratch", mnt, "--log-file", tmp_path / "log")
    pid = int(mount_record(mnt)["pid"])
    os.kill(pid, signal.SIGKILL)  # a crash: no unmount, no cleanup
    with contextlib.suppress(ProcessLookupError):
        pidfd = os.pidfd_open(pid)
        try:
            select.select([pidfd], [], [], 30)
        finally:
            os.close(pidfd)
    done = run_cli("mount", "--type", "mem", "again", mnt, check=False)
    assert done.returncode == ExitCode.MOUNTPOINT
    assert "server is gone" in _one_line(done.stderr) and "occlumfs umount" in done.stderr
    run_cli("umount", mnt)
    assert not _is_mounted(mnt) and mount_record(mnt) is None
    with _mounted_again(mnt, tmp_path):
        (mnt / "f").write_bytes(b"usable again")
        assert (mnt / "f").read_bytes() == b"usable again"


@contextlib.contextmanager
def _mounted_again(mnt: Path, tmp_path: Path):
    run_cli("mount", "--type", "mem", "again", mnt, "--log-file", tmp_path / "log2")
    try:
        yield
    finally:
        run_cli("umount", mnt)


# -- foreground --------------------------------------------------------------------------


@contextlib.contextmanager
def _foreground(mnt: Path, log: Path):
    cmd = [*OCCLUMFS, "mount", "-t", "mem", "x", str(mnt), "-f", "--log-file", str(log)]
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as server:
        try:
            _wait_until_mounted(mnt, server)
            yield server
        finally:
            server.kill()


def test_foreground_keeps_the_server_attached(mnt, tmp_path):
    with _foreground(mnt, tmp_path / "log") as server:
        (mnt / "f").write_bytes(b"served by the foreground process")
        assert (mnt / "f").read_bytes() == b"served by the foreground process"
        assert server.poll() is None
        assert int(mount_record(mnt)["pid"]) == server.pid  # no fork: this is the server
        run_cli("umount", mnt)
        assert server.wait(timeout=30) == 0
    assert not _is_mounted(mnt)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_to_a_foreground_server_unmounts_cleanly(mnt, tmp_path, signum):
    with _foreground(mnt, tmp_path / "log") as server:
        server.send_signal(signum)
        assert server.wait(timeout=30) == 0, server.stderr.read()
    assert not _is_mounted(mnt)
    assert f"received {signal.Signals(signum).name}" in (tmp_path / "log").read_text()


# -- mistakes ------------------------------------------------------------------------------


def test_missing_mountpoint_is_a_clear_error(tmp_path):
    done = run_cli("mount", "--type", "mem", "x", tmp_path / "nope", check=False)
    assert done.returncode == ExitCode.MOUNTPOINT
    assert "does not exist" in _one_line(done.stderr)


def test_mountpoint_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    done = run_cli("mount", "--type", "mem", "x", tmp_path / "file", check=False)
    assert done.returncode == ExitCode.MOUNTPOINT
    assert "not a directory" in _one_line(done.stderr)


def test_already_mounted_is_a_clear_error(mount):
    with mount("scratch", "--type", "mem") as mnt:
        done = run_cli("mount", "--type", "mem", "x", mnt, check=False)
        assert done.returncode == ExitCode.MOUNTPOINT
        assert "already mounted" in _one_line(done.stderr)
        assert _is_mounted(mnt)
        (mnt / "still").write_bytes(b"served")  # the first mount is unharmed
        assert (mnt / "still").read_bytes() == b"served"


def test_a_non_empty_mountpoint_is_refused_unless_nonempty(tmp_path, mnt):
    (mnt / "kept").write_bytes(b"would be hidden")
    done = run_cli("mount", "--type", "mem", "x", mnt, check=False)
    assert done.returncode == ExitCode.MOUNTPOINT
    line = _one_line(done.stderr)
    assert "not empty" in line and "'kept'" in line and "--nonempty" in line
    assert not _is_mounted(mnt)
    run_cli("mount", "--type", "mem", "x", mnt, "--nonempty", "--log-file", tmp_path / "log")
    try:
        assert os.listdir(mnt) == []  # hidden while mounted
    finally:
        run_cli("umount", mnt)
    assert (mnt / "kept").read_bytes() == b"would be hidden"


def test_umount_of_unmounted_dir_is_a_clear_error(tmp_path):
    done = run_cli("umount", tmp_path, check=False)
    assert done.returncode == ExitCode.MOUNTPOINT
    assert "not mounted" in _one_line(done.stderr)


def test_an_unwritable_log_file_is_a_clear_error_before_mounting(tmp_path, mnt):
    log = tmp_path / "no-such-dir" / "server.log"
    done = run_cli("mount", "--type", "mem", "x", mnt, "--log-file", log, check=False)
    assert done.returncode == ExitCode.ERROR
    assert "cannot write the log file" in _one_line(done.stderr)
    assert not _is_mounted(mnt)


def test_mem_source_that_is_a_file_is_a_usage_error(tmp_path, mnt):
    (tmp_path / "file").write_bytes(b"")
    done = run_cli("mount", "--type", "mem", tmp_path / "file", mnt, check=False)
    assert done.returncode == ExitCode.USAGE
    assert "directory" in _one_line(done.stderr)
    assert not _is_mounted(mnt)


_FAILS_TO_START = """
import sys
from pathlib import Path
from occlumfs.errors import OcclumfsError
from occlumfs.memfs import MemFS
from occlumfs.mount import serve

class FailsToStart(MemFS):
    def started_serving(self):
        raise RuntimeError("cannot take the lock")

try:
    serve(FailsToStart(), Path(sys.argv[1]), log_file=Path(sys.argv[2]))
except OcclumfsError as exc:
    print(exc)
    sys.exit(7)
"""


def test_a_server_that_fails_to_start_is_an_error_and_leaves_no_mount(mnt, tmp_path):
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-c", _FAILS_TO_START, str(mnt), str(log)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 7, done.stderr
    assert "failed to start" in done.stdout and str(log) in done.stdout
    assert not _is_mounted(mnt)
    assert mount_record(mnt) is None
    assert "RuntimeError: cannot take the lock" in log.read_text()


# -- the outcome of the final commit ------------------------------------------------------


@contextlib.contextmanager
def _sefs_store(tmp_path: Path, where: Path):
    """A fresh SEFS at ``where/store`` with its key and state in tmp_path: the mount args."""
    key, state = tmp_path / "key", tmp_path / "state"
    run_cli("keygen", key)
    run_cli("sefs", "create", where / "store", "--key-file", key, "--state-dir", state)
    yield [where / "store", "--key-file", key, "--state-dir", state]


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=True)


def _fill(disk: Path) -> None:
    """Write to ``disk`` until it is full."""
    chunk = bytes(1 << 20)
    with open(disk / "filler", "wb", buffering=0) as f:
        with pytest.raises(OSError) as full:
            while True:
                f.write(chunk)
        assert full.value.errno == errno.ENOSPC


def test_umount_fails_when_the_final_commit_finds_the_disk_full(tmp_path, mnt):
    with _tmpfs(tmp_path / "disk", "30m") as disk, _sefs_store(tmp_path, disk) as store:
        log = tmp_path / "server.log"
        cmd = [*OCCLUMFS, "mount", *map(str, (store[0], mnt, *store[1:])), "-f"]
        # In the foreground, so that the server's own exit status is seen too.
        with subprocess.Popen([*cmd, "--log-file", str(log)], stderr=subprocess.PIPE) as server:
            try:
                _wait_until_mounted(mnt, server)
                (mnt / "note").write_bytes(b"written, never synced")
                _fill(disk)
                done = run_cli("umount", mnt, check=False)
                _, server_err = server.communicate(timeout=60)
            finally:
                server.kill()
        assert done.returncode == ExitCode.NOT_SAVED, done.stderr
        line = _one_line(done.stderr)
        assert "final commit" in line and "No space left on device" in line
        assert "not saved" in line
        assert server.returncode == ExitCode.NOT_SAVED
        assert "final commit" in _one_line(server_err.decode())
        assert not _is_mounted(mnt)
        assert "No space left on device" in log.read_text()
        # Nothing half-written: with room again, the store mounts with what it had.
        (disk / "filler").unlink()
        with _mounted_again_from(store, mnt, tmp_path):
            assert os.listdir(mnt) == []


def test_umount_fails_when_the_server_dies_before_confirming_the_commit(tmp_path, mnt):
    with _sefs_store(tmp_path, tmp_path) as store:
        run_cli("mount", store[0], mnt, *store[1:], "--log-file", tmp_path / "server.log")
        pid = int(mount_record(mnt)["pid"])
        fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"data")
        os.fsync(fd)  # no dirty pages: the kernel needs nothing more from the server
        os.close(fd)
        os.kill(pid, signal.SIGSTOP)  # a server that has not committed yet, deterministically
        try:
            with subprocess.Popen(
                [*OCCLUMFS, "umount", str(mnt)], stderr=subprocess.PIPE, text=True
            ) as umount:
                _wait_until_unmounted(mnt, umount)  # umount now waits for the server
                os.kill(pid, signal.SIGKILL)
                _, err = umount.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert umount.returncode == ExitCode.NOT_SAVED, err
        assert "without confirming its final commit" in _one_line(err)
        assert mount_record(mnt) is None


def _wait_until_unmounted(mnt: Path, waiter: subprocess.Popen) -> None:
    """Until ``mnt`` leaves the mount table: woken by the kernel (POLLPRI on mountinfo)."""
    with open("/proc/self/mountinfo", "rb") as table:
        watch = select.poll()
        watch.register(table, select.POLLPRI)
        deadline = time.monotonic() + READY_SECONDS
        while _is_mounted(mnt):
            assert waiter.poll() is None, f"exited {waiter.returncode} with {mnt} still mounted"
            left = deadline - time.monotonic()
            assert left > 0, f"{mnt} still mounted after {READY_SECONDS}s"
            watch.poll(left * 1000)
            table.seek(0)
            table.read()


@contextlib.contextmanager
def _mounted_again_from(store: list, mnt: Path, tmp_path: Path):
    run_cli("mount", store[0], mnt, *store[1:], "--log-file", tmp_path / "again.log")
    try:
        yield
    finally:
        run_cli("umount", mnt)


_SERVE = """
import sys
from pathlib import Path
from occlumfs.memfs import MemFS
from occlumfs.mount import serve

handle = serve(MemFS(), Path(sys.argv[1]), log_file=Path(sys.argv[2]))
print(handle.pid, handle.mountpoint, handle.log_file)
"""


def test_serve_returns_a_handle_naming_the_detached_server(mnt, tmp_path):
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-c", _SERVE, str(mnt), str(log)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    try:
        pid, mountpoint, log_file = done.stdout.split()
        assert int(pid) == int(mount_record(mnt)["pid"]) != os.getpid()
        assert (mountpoint, log_file) == (str(mnt), str(log))
        assert not process_exited(int(pid))
    finally:
        run_cli("umount", mnt)
    assert process_exited(int(pid))
