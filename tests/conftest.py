"""Shared fixtures: run the real CLI, mount real FUSE filesystems, always clean up.

Two tiers (README): a test that mounts is marked ``fuse``; ``pytest -m "not fuse"``
runs the rest, in-process and fast. A test that mounts without the marker fails
(see pytest_runtest_setup).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from occlumfs.mount import mount_record, mounted_paths, process_alive, wait_for_exit


def _require_fuse() -> None:
    # FUSE is part of the platform this project runs on: its absence is a
    # failure of the machine, never a reason to skip.
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing: FUSE tests cannot run"
    assert shutil.which("fusermount3"), "fusermount3 is missing (apt-get install fuse3)"


def pytest_sessionstart(session):
    # Mount records and default server logs go to a per-session directory, set
    # before any fixture mounts anything, so that mounts shared by many tests
    # and the CLI processes see the same one.
    os.environ[_RUNTIME_ENV] = tempfile.mkdtemp(prefix="occlumfs-run-")


def pytest_sessionfinish(session):
    shutil.rmtree(os.environ.pop(_RUNTIME_ENV, ""), ignore_errors=True)


_mounts_allowed = True  # whether the test being set up, run or torn down is marked fuse


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    # A hook, not a fixture: it runs before any fixture of the test, so a
    # session-scoped fixture that mounts for this test is checked too.
    global _mounts_allowed
    _mounts_allowed = item.get_closest_marker("fuse") is not None
    if not _mounts_allowed:
        # Every occlumfs server, in this process or any child, creates its
        # runtime directory once it serves: a fresh, absent one per unmarked
        # test shows whether the test mounted, however it did.
        item.stash[_UNMARKED_RUNTIME] = (os.environ.get(_RUNTIME_ENV), _fresh_runtime_dir())
        os.environ[_RUNTIME_ENV] = str(item.stash[_UNMARKED_RUNTIME][1])
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    # Before any fixture is torn down: the last test's teardown also closes
    # the session's shared mounts, which were recorded in the session's dir.
    saved = item.stash.get(_UNMARKED_RUNTIME, None)
    if saved is None:
        return (yield)
    previous, runtime = saved
    if previous is None:
        os.environ.pop(_RUNTIME_ENV, None)
    else:
        os.environ[_RUNTIME_ENV] = previous
    served = runtime.exists()
    shutil.rmtree(runtime.parent, ignore_errors=True)
    result = yield
    if served:
        pytest.fail(f"{item.nodeid} mounts a FUSE filesystem: mark it pytest.mark.fuse")
    return result


_RUNTIME_ENV = "OCCLUMFS_RUNTIME_DIR"
_UNMARKED_RUNTIME = pytest.StashKey[tuple]()


def _fresh_runtime_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="occlumfs-unmarked-")) / "run"


def _require_fuse_marker() -> None:
    if not _mounts_allowed:
        pytest.fail("this test mounts a FUSE filesystem: mark it with pytest.mark.fuse")


def run_cli(
    *args: str | os.PathLike,
    check: bool = True,
    input: bytes | None = None,
    env: dict | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run ``occlumfs ARGS`` as a user would, capturing output as text."""
    cmd = [sys.executable, "-m", "occlumfs", *map(str, args)]
    done = subprocess.run(
        cmd, capture_output=True, input=input, timeout=timeout, env={**os.environ, **(env or {})}
    )
    out = subprocess.CompletedProcess(
        done.args,
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr}")
    return out


def process_exited(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (a background server is not our child)."""
    return not process_alive(pid)


def _force_unmount(mnt: Path) -> None:
    """Detach ``mnt`` and end its server even with files still open in it.

    A failing test's traceback keeps its open files alive, so a lazy unmount
    alone would leave the server holding the store (and a later check of it
    would find it in use): the server is killed, as a crash would end it, and
    its exit is awaited.
    """
    if mnt.resolve() not in mounted_paths():
        return
    record = mount_record(mnt)
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
    if record is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(record["pid"]), signal.SIGKILL)
        wait_for_exit(int(record["pid"]), 30)


_LOG_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL): |^Traceback ")


@contextmanager
def mounted(
    source: str | os.PathLike,
    mnt: Path,
    *options: str | os.PathLike,
    log_file: Path | None = None,
    allow_log_errors: bool = False,
) -> Iterator[Path]:
    """Mount with the real ``occlumfs mount`` (background server) and unmount after.

    On leaving: ``occlumfs umount`` must succeed and the server must exit; the
    server log must hold no WARNING, ERROR or traceback unless ``allow_log_errors``.
    """
    _require_fuse()
    _require_fuse_marker()
    mnt.mkdir(parents=True, exist_ok=True)
    log_file = log_file or mnt.with_name(mnt.name + ".log")
    run_cli("mount", source, mnt, *options, "--log-file", log_file)
    try:
        assert mnt.resolve() in mounted_paths(), f"{mnt} not mounted after 'occlumfs mount'"
        yield mnt
    except BaseException:
        _force_unmount(mnt)
        raise
    record = mount_record(mnt)
    umounted = run_cli("umount", mnt, check=False)
    if umounted.returncode != 0:
        _force_unmount(mnt)
        raise AssertionError(f"occlumfs umount {mnt} failed: {umounted.stderr}")
    assert mnt.resolve() not in mounted_paths()
    assert record is not None, f"the server of {mnt} left no mount record"
    assert process_exited(int(record["pid"])), "occlumfs umount returned before the server exited"
    if not allow_log_errors and log_file.exists():
        text = log_file.read_text(errors="replace")
        # Unexpected warnings fail a test like errors do.
        bad = [line for line in text.splitlines() if _LOG_PROBLEM.search(line)]
        assert not bad, "server log:\n" + "\n".join(bad[:30])


@pytest.fixture
def mount(tmp_path) -> Callable[..., contextmanager]:
    """``with mount(source, *options) as mnt:`` — a fresh mountpoint per call."""
    counter = iter(range(1_000_000))

    def _mount(source, *options, **kwargs):
        return mounted(source, tmp_path / f"mnt{next(counter)}", *options, **kwargs)

    return _mount
