"""The instance's ``/``: mounted over FUSE by a server outside the sandbox.

:func:`mount_rootfs` opens the filesystem in the foreground (a wrong key or
digest fails here, in one line), then forks the FUSE server as *our* child,
in its own session (Ctrl-C on the terminal is for the program, not the
server), so that :func:`unmount_rootfs` learns from its exit status whether
the final commit succeeded.

The rootfs is the union (:func:`occlumfs.unionfs.open_union`) of the build's
image layers, pinned to the digests in the signed manifest, under the SEFS
store in ``run/`` keyed by the image key or the autokey; the SEFS trusted
state (its rollback pin) lives in the machine state directory, outside the
instance.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from libos.build import VerifiedBuild
from occlumfs.errors import OcclumfsError

PR_SET_PDEATHSIG = 1


@dataclass
class RootfsHandle:
    mountpoint: Path
    server_pid: int
    log_file: Path


def _open_rootfs(build: VerifiedBuild, read_only: bool):
    """The filesystem object for ``/``."""
    from libos.rebase import record_store_digests, store_digests
    from occlumfs.unionfs import LayerMismatchError, Lower, open_union

    lowers = [Lower(path, digest, key) for path, digest, key in build.layers]
    upper = build.instance.upper
    upper.parent.mkdir(parents=True, exist_ok=True)
    digests = [digest for _path, digest, _key in build.layers]
    mismatch = LayerMismatchError(
        f"{upper}: the writable layer was made over another build of the image; "
        "its previous build is gone, so it cannot be moved onto this one: "
        "restore that build, or move the store away"
    )
    bound = store_digests(upper)
    if bound is not None and bound != digests:
        raise mismatch
    try:
        fs = open_union(
            lowers,
            upper,
            key=build.fs_key,
            state_dir=sefs_state_dir(),
            read_only=read_only,
            create=not read_only,
        )
    except LayerMismatchError:
        raise mismatch from None
    if not read_only:
        record_store_digests(upper, digests)
    return fs


def sefs_state_dir() -> Path:
    """Where the SEFS stores' trusted state (rollback pins) lives: beside the machine secret."""
    from libos.machine import private_state_dir

    return private_state_dir() / "sefs-state"  # made on a machine that has only image keys too


def _runtime_dir(build: VerifiedBuild) -> Path:
    runtime_dir = _mount_module().runtime_dir
    tag = hashlib.sha256(os.fsencode(build.instance.root)).hexdigest()[:16]
    path = runtime_dir() / "occlum" / tag
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _clear_stale(mountpoint: Path) -> None:
    """A mount left by a crashed run (we hold the instance lock: nobody uses it)."""
    mounted_paths = _mount_module().mounted_paths
    with contextlib.suppress(OSError):
        if mountpoint.resolve() in mounted_paths():
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


def _mount_module():
    """:mod:`occlumfs.mount`, imported when first needed (occlumfs/fuselib.py keeps
    pyfuse3's import from loading trio and importlib.metadata)."""
    import occlumfs.mount

    return occlumfs.mount


def rootfs_mountpoint(build: VerifiedBuild) -> Path:
    """Where :func:`mount_rootfs` mounts the instance's ``/``."""
    return _runtime_dir(build) / "root"


def mount_rootfs(build: VerifiedBuild, *, read_only: bool = False) -> RootfsHandle:
    mount = _mount_module()
    serve = mount.serve
    # A malformed $OCCLUMFS_BUSY_POLL_US is the user's error, said here, not
    # a server that failed to start.
    mount.busy_poll_ns()
    mountpoint = rootfs_mountpoint(build)
    base = mountpoint.parent
    mountpoint.mkdir(exist_ok=True)
    _clear_stale(mountpoint)
    log_file = base / "server.log"
    fs = _open_rootfs(build, read_only)
    ready_r, ready_w = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the server
        status = 1
        try:
            os.close(ready_r)
            os.setsid()
            stops = _survive_repeated_stops()
            _end_with_parent(parent)
            devnull = os.open(os.devnull, os.O_RDWR)
            log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            for fd, target in ((devnull, 0), (devnull, 1), (log, 2)):
                os.dup2(fd, target)
            started = fs.started_serving

            def announce() -> None:
                started()
                if stops:  # arrived before serving: pending now, it ends the serving
                    os.kill(os.getpid(), signal.SIGTERM)
                os.write(ready_w, b"1")
                os.close(ready_w)

            fs.started_serving = announce
            serve(fs, mountpoint, foreground=True, log_file=log_file)
            status = 0
        except BaseException as exc:  # reported through the exit status and the log
            with contextlib.suppress(Exception):
                os.write(2, f"rootfs server: {exc}\n".encode())
        finally:
            os._exit(status)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready_pipe:
        ready = ready_pipe.read(1)  # empty: the server exited before serving
    if not ready:
        os.waitpid(pid, 0)
        raise OcclumfsError(f"the rootfs server failed to start; see {log_file}")
    return RootfsHandle(mountpoint, pid, log_file)


def _survive_repeated_stops() -> list[int]:
    """SIGTERM/SIGINT after the first one must not kill the server mid-commit.

    The parent-death signal comes once per thread of a dying multithreaded
    parent (the ``occlum start`` server: the kernel hands the child to each
    surviving thread in turn, signalling each time). The serving loop turns
    the first stop signal into an unmount, then puts back the handlers it
    found: these, which only note the signal, instead of the default that
    would end the process before its final commit.
    """
    stops: list[int] = []

    def note(signum: int, _frame) -> None:
        stops.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, note)
    return stops


def _end_with_parent(parent: int) -> None:
    """SIGTERM this server when occlum run dies (even by SIGKILL): it then
    unmounts, commits and exits, instead of serving a mount nobody will end."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def unmount_rootfs(handle: RootfsHandle) -> None:
    """Unmount and wait for the server; raise when it failed to commit.

    A server that died leaves a dead mount: it is detached (lazily) so the next
    run can mount again, and the run fails all the same.
    """
    umount = _mount_module().umount
    problem = None
    try:
        umount(handle.mountpoint)
    except OcclumfsError as exc:
        problem = str(exc)
        subprocess.run(["fusermount3", "-uz", str(handle.mountpoint)], capture_output=True)
    _pid, status = os.waitpid(handle.server_pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or problem:
        why = problem or (f"server killed by signal {-code}" if code < 0 else "see the log")
        raise OcclumfsError(
            f"committing the instance's writable layer FAILED ({why}): data written in "
            f"this run may be lost; see {handle.log_file}"
        )


MAX_LINKS = 40  # the kernel's ELOOP bound


def resolve_inside(root: Path, path: str) -> str | None:
    """``path`` with every symbolic link followed inside ``root`` (an absolute link
    starts again at ``root``); None when a component is missing or links loop."""
    done: list[str] = []
    todo = [p for p in path.split("/") if p][::-1]
    links = 0
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        try:
            mode = os.lstat(here).st_mode
        except OSError:
            return None
        if not stat.S_ISLNK(mode):
            done.append(part)
            continue
        links += 1
        if links > MAX_LINKS:
            return None
        target = os.readlink(here)
        if target.startswith("/"):
            done = []
        todo.extend(p for p in reversed(target.split("/")) if p)
    return "/" + "/".join(done)


def is_dir_inside(root: Path, path: str) -> bool:
    """Whether ``path`` names a directory as a program in the sandbox rooted at ``root``
    sees it: symbolic links are followed inside ``root``, never out to the host."""
    inside = resolve_inside(root, path)
    if inside == "/":  # no request for the root, on exec's hot path
        return True
    return inside is not None and os.path.isdir(root / inside.lstrip("/"))
