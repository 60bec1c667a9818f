"""Serve a filesystem object at a mountpoint, in the foreground or the background.

``serve`` mounts first and only then detaches, the way libfuse daemonizes: when
the command returns, the mount is in place and requests queue for the server.
Everything that can fail for a user reason (wrong key, bad digest, busy
mountpoint) fails before the fork, in the foreground, with a one-line error.

The server keeps a small record per mount in the runtime directory (pid and
log file), so ``occlumfs umount`` can wait for the server to finish committing
before it returns. When the filesystem's final ``close`` (its last commit)
returns or fails, the server writes the outcome to a result file beside the
record; ``umount`` reads it and fails with :class:`NotSavedError` when the
commit failed or the server exited without writing it. SIGINT and SIGTERM
make the server unmount and exit cleanly.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from occlumfs.adapter import FuseOperations
from occlumfs.errors import (
    ExitCode,
    InUseError,
    MountpointError,
    MountpointNotEmptyError,
    NotSavedError,
    OcclumfsError,
)
from occlumfs.fs import Filesystem
from occlumfs.fuselib import pyfuse3
from occlumfs.requestloop import STOP_SIGNALS, RequestLoop, busy_poll_ns

log = logging.getLogger("occlumfs.mount")

UMOUNT_WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class MountHandle:
    """A mount made by :func:`serve`: who serves it, where, and where it logs.

    For a background server, ``pid`` is the detached server; for a foreground
    one, the calling process (and :func:`serve` returns once it has finished).
    """

    pid: int
    mountpoint: Path
    log_file: Path | None


def runtime_dir() -> Path:
    """Where mount records live: ``$OCCLUMFS_RUNTIME_DIR``, else /run/occlumfs (root)."""
    env = os.environ.get("OCCLUMFS_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/occlumfs")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/occlumfs-{os.getuid()}"
    return Path(base) / "occlumfs"


def _record_path(mountpoint: Path) -> Path:
    key = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    return runtime_dir() / f"{key}.json"


def _result_path(mountpoint: Path) -> Path:
    return _record_path(mountpoint).with_suffix(".result")


def mount_record(mountpoint: Path) -> dict | None:
    """What the server serving ``mountpoint`` recorded (``pid``, ``mountpoint``,
    ``fsname``), or None when there is no readable record."""
    path = _mounted_path(mountpoint) or Path(os.path.abspath(mountpoint)).resolve()
    try:
        return json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None


def _mountinfo() -> list[tuple[str, Path]]:
    """(major:minor, mountpoint) of each mount in this namespace, oldest first."""
    mounts = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            field = fields[4]
            # mountinfo escapes space, tab, newline and backslash as octal.
            for code in (b"\\040", b"\\011", b"\\012", b"\\134"):
                field = field.replace(code, bytes([int(code[1:], 8)]))
            mounts.append((fields[2].decode(), Path(os.fsdecode(field))))
    return mounts


def mounted_paths() -> set[Path]:
    """Mountpoints in this mount namespace, from /proc/self/mountinfo."""
    return {path for _device, path in _mountinfo()}


def set_readahead(mountpoint: Path, kb: int) -> None:
    """Set the kernel read-ahead of the newest mount at ``mountpoint`` to ``kb`` KiB.

    A FUSE mount reads ahead 128 KiB, so a sequential read arrives as 128 KiB
    requests, each paying the per-request cost of the Python server. The
    kernel resets the value when FUSE_INIT is answered: call this after.
    """
    devices = [device for device, path in _mountinfo() if path == mountpoint]
    if not devices:
        return
    try:
        Path(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb").write_text(f"{kb}\n")
    except OSError as exc:
        log.info("cannot set the read-ahead of %s: %s", mountpoint, exc)


def _mounted_path(mountpoint: Path) -> Path | None:
    """The mount table's name for ``mountpoint``, or None when nothing is mounted there.

    Only the parent is resolved first: looking up a mountpoint itself asks its
    server, which may be stopped (the lookup hangs) or gone.
    """
    path = Path(os.path.abspath(mountpoint))
    mounted = mounted_paths()
    path = path.parent.resolve() / path.name
    if path not in mounted:
        path = path.resolve()  # a symlink to a mountpoint
    return path if path in mounted else None


def check_mountpoint(mountpoint: Path, *, nonempty: bool = False) -> Path:
    """The absolute mountpoint, or a MountpointError saying what is wrong with it.

    A mountpoint that holds entries is refused unless ``nonempty``: the mount
    would hide them.
    """
    path = Path(os.path.abspath(mountpoint))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountpointError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise _dead_mount(mountpoint) from None
        raise MountpointError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountpointError(f"mountpoint {mountpoint} is not a directory")
    if path.resolve() in mounted_paths():
        record = mount_record(path)
        if record is not None and not process_alive(int(record.get("pid", 0))):
            raise _dead_mount(mountpoint)
        raise MountpointError(f"mountpoint {mountpoint} is already mounted")
    if not nonempty:
        try:
            with os.scandir(path) as entries:
                hidden = next(entries, None)
        except OSError as exc:
            raise MountpointError(f"mountpoint {mountpoint}: {exc.strerror}") from None
        if hidden is not None:
            raise MountpointNotEmptyError(
                f"mountpoint {mountpoint} is not empty: the mount would hide {hidden.name!r}"
            )
    return path.resolve()


def _dead_mount(mountpoint: Path) -> MountpointError:
    return MountpointError(
        f"mountpoint {mountpoint} is still mounted but its server is gone; "
        f"run 'occlumfs umount {mountpoint}' first"
    )


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _configure_logging(log_file: Path | None, debug: bool) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _detach(log_file: Path | None) -> tuple[int, int | None]:
    """Fork into the background: ``(server pid, None)`` in the caller, ``(0, fd)`` in the server.

    The server gets the write end of a readiness pipe: it writes one byte to it
    once its mount record exists and the filesystem has started serving. The
    caller waits for that byte, so that when it returns, ``occlumfs umount``
    can already find the server; or it raises if the server died first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child != 0:
        os.close(ready_w)
        try:
            ready = os.read(ready_r, 1)
        finally:
            os.close(ready_r)
        if not ready:
            raise OcclumfsError(f"the server failed to start; see {log_file}")
        return child, None
    os.close(ready_r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if log_file is None:
        os.dup2(devnull, 2)
    else:
        err = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(err, 2)
        os.close(err)
    os.close(devnull)
    return 0, ready_w


def serve(
    fs: Filesystem,
    mountpoint: Path,
    *,
    foreground: bool = False,
    log_file: Path | None = None,
    debug: bool = False,
    allow_other: bool | None = None,
    nonempty: bool = False,
) -> MountHandle:
    """Mount ``fs`` at ``mountpoint`` and serve it until unmounted.

    In the background (the default) the caller returns as soon as the mount is
    in place and the server carries on in a detached child, logging to
    ``log_file`` (default: beside its mount record in :func:`runtime_dir`).
    SIGINT and SIGTERM unmount cleanly from the moment the mount exists: they
    are held back until the server is ready to handle them, never lost.
    In the foreground, returns once unmounted, and raises NotSavedError when
    the filesystem's final commit failed.
    """
    target = check_mountpoint(mountpoint, nonempty=nonempty)
    busy_poll = busy_poll_ns()
    if log_file is not None:
        log_file = Path(os.path.abspath(log_file))
        try:  # fail here, in the foreground, not in the detached server
            with open(log_file, "a"):
                pass
        except OSError as exc:
            raise OcclumfsError(f"cannot write the log file {log_file}: {exc.strerror}") from None
    if allow_other is None:
        allow_other = os.geteuid() == 0
    options = set(pyfuse3.default_options)
    options |= {f"fsname={fs.info.name}", f"subtype={fs.info.subtype}", "default_permissions"}
    if fs.info.read_only:
        options.add("ro")
    if allow_other:
        options.add("allow_other")
    ops = FuseOperations(fs)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        try:
            pyfuse3.init(ops, str(target), options)
        except RuntimeError as exc:
            raise MountpointError(f"cannot mount at {mountpoint}: {exc}") from None
        record = _record_path(target)
        ready = None
        if not foreground:
            if log_file is None:
                log_file = record.with_suffix(".log")
                log_file.parent.mkdir(parents=True, exist_ok=True)
            try:
                server, ready = _detach(log_file)
            except OcclumfsError:
                # The server died before serving; it unmounts on the way out,
                # but a server killed outright leaves the mount behind.
                if target in mounted_paths():
                    subprocess.run(["fusermount3", "-uz", str(target)], capture_output=True)
                raise
            if ready is None:
                return MountHandle(server, target, log_file)
        try:
            status = _serve_mounted(fs, target, record, ready, log_file, debug, mask, busy_poll)
        except BaseException:
            if foreground:
                raise
            os._exit(1)  # a detached server never returns into its caller's code
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if not foreground:
        os._exit(status)
    if status == ExitCode.NOT_SAVED:
        raise NotSavedError(f"the final commit of {fs.info.name} failed; see the log")
    if status:
        raise OcclumfsError(f"server for {target} failed; see the log")
    return MountHandle(os.getpid(), target, log_file)


def _serve_mounted(
    fs: Filesystem,
    target: Path,
    record: Path,
    ready: int | None,
    log_file: Path | None,
    debug: bool,
    unblocked_mask: set[signal.Signals],
    busy_poll: int,
) -> int:
    """Serve the mount made by :func:`serve` until unmounted; the exit status."""
    _configure_logging(log_file, debug)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(
            json.dumps({"pid": os.getpid(), "mountpoint": str(target), "fsname": fs.info.name})
        )
    except OSError as exc:
        log.warning("cannot write mount record %s: %s", record, exc)
    status = 0
    serving = False
    try:
        fs.started_serving()
        serving = True
        log.info("serving %s at %s (pid %d)", fs.info.name, target, os.getpid())
        if ready is not None:
            os.write(ready, b"1")
            os.close(ready)
        loop = RequestLoop(busy_poll)
        readahead_kb = fs.info.readahead_kb
        if readahead_kb:
            loop.after_init = lambda: set_readahead(target, readahead_kb)
        try:
            loop.serve(unblocked_mask)
        finally:
            loop.close()
    except BaseException:
        log.exception("server failed")
        status = 1
    finally:
        pyfuse3.close(unmount=True)
        error = None
        try:
            fs.close()
        except Exception as exc:
            log.exception("closing %s failed", fs.info.name)
            error = _describe_failure(exc)
            status = ExitCode.NOT_SAVED
        if serving:
            _write_result(target, fs.info.name, error)
        with contextlib.suppress(FileNotFoundError):
            record.unlink()
        log.info("unmounted %s", target)
    return status


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _write_result(target: Path, fsname: str, error: str | None) -> None:
    """Record how the final commit went, for ``umount``: whole or not at all."""
    result = _result_path(target)
    outcome = {"pid": os.getpid(), "fsname": fsname, "saved": error is None, "error": error}
    tmp = result.with_name(f"{result.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(outcome))
        os.replace(tmp, result)
    except OSError as exc:
        # umount then reports the commit as unconfirmed, which is the truth.
        log.error("cannot write the result file %s: %s", result, exc)


def _read_result(target: Path, pid: int) -> dict | None:
    """The outcome written by server ``pid``, consumed; None when it wrote none."""
    result = _result_path(target)
    try:
        outcome = json.loads(result.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(outcome, dict) or outcome.get("pid") != pid:
        return None
    with contextlib.suppress(FileNotFoundError):
        result.unlink()
    return outcome


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` (any process, not only a child) to exit."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(pidfd)


def umount(
    mountpoint: Path,
    *,
    lazy: bool = False,
    timeout: float = UMOUNT_WAIT_SECONDS,
    warn: Callable[[str], None] = log.warning,
) -> None:
    """Unmount, wait for the server to finish its final commit and exit, and check it.

    A busy mount (files open in it) is an InUseError. ``lazy`` detaches it at
    once even so, and does not wait: the server finishes when the last file
    open in it is closed, which may be any time later, and its outcome is not
    checked. Otherwise a NotSavedError says when the final commit failed or
    the server exited without confirming it. A mount whose server had died
    before this call is cleared, with a word to ``warn``.
    """
    path = _mounted_path(mountpoint)
    if path is None:
        raise MountpointError(f"{mountpoint} is not mounted")
    pid = None
    with contextlib.suppress(TypeError, ValueError, KeyError):
        pid = int(mount_record(path)["pid"])
    served = pid is not None and process_alive(pid)
    fusermount = shutil.which("fusermount3") or "fusermount3"
    cmd = [fusermount, "-u"] + (["-z"] if lazy else []) + [str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        if "busy" in reason.lower():
            raise InUseError(f"cannot unmount {mountpoint}: it is busy (files are open in it)")
        raise MountpointError(f"cannot unmount {mountpoint}: {reason}")
    if lazy:
        return
    if served and not wait_for_exit(pid, timeout):
        raise OcclumfsError(f"server pid {pid} for {mountpoint} did not exit in {timeout:.0f}s")
    # A server that exits removes its record; one that died left it behind.
    with contextlib.suppress(FileNotFoundError):
        _record_path(path).unlink()
    if pid is None:
        return  # not a mount this tool made, or its record was lost: nothing to check
    if not served:
        warn(
            f"the server of {mountpoint} had died before this unmount; what it had not "
            "committed is lost"
        )
        return
    outcome = _read_result(path, pid)
    if outcome is None:
        raise NotSavedError(
            f"the server of {mountpoint} (pid {pid}) exited without confirming its final "
            "commit: changes not synced before the unmount may be lost"
        )
    if not outcome.get("saved"):
        raise NotSavedError(
            f"the final commit of {outcome.get('fsname', mountpoint)} failed "
            f"({outcome.get('error')}): changes not synced before the unmount were not saved"
        )
