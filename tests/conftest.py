"""Shared fixtures: run the real CLI, mount real FUSE filesystems, always clean up."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from occlumfs.mount import mount_record, mounted_paths, process_alive


def _require_fuse() -> None:
    # FUSE is part of the platform this project runs on: its absence is a
    # failure of the machine, never a reason to skip.
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing: FUSE tests cannot run"
    assert shutil.which("fusermount3"), "fusermount3 is missing (apt-get install fuse3)"


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


@pytest.fixture(scope="session", autouse=True)
def _runtime_dir(tmp_path_factory):
    """Mount records and default server logs go to a per-session directory.

    Session-wide (and set before any other session fixture mounts anything), so
    that mounts shared by many tests and the CLI processes see the same one.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OCCLUMFS_RUNTIME_DIR", str(tmp_path_factory.getbasetemp() / "run"))
        yield


def process_exited(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (a background server is not our child)."""
    return not process_alive(pid)


def _force_unmount(mnt: Path) -> None:
    if mnt.resolve() in mounted_paths():
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)


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
