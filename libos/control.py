"""``occlum start``, ``exec``, ``stop``, ``kill`` and the started half of ``status``.

``start`` takes the instance lock, verifies the build (as ``run`` does), and
forks the server (libos/server.py) into its own session; it returns when the
server says it is ready, or with the server's one-line error. The server
holds the lock from then on (and its FUSE server, a fork of it, until the
last commit is done), so ``run`` and a second ``start`` refuse (16).

A server that died (killed with SIGKILL, say) leaves ``run/occlum.sock``
behind: the next command finds nobody answering, waits for the lock (the
FUSE server commits and unmounts when its parent dies), says so, and
removes the socket. The writable layer keeps what was last committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys

from libos.instance import Instance
from libos.protocol import (
    DEFAULT_STOP_TIMEOUT,
    NOT_STARTED,
    ServerError,
    in_run_dir,
    raise_if_error,
    read_answer,
    try_connect,
)
from occlumfs.errors import InUseError, NotFoundError, NotSavedError, OcclumfsError


def socket_path_of(instance: Instance) -> str:
    from libos.protocol import SOCKET_NAME

    return str(instance.run / SOCKET_NAME)


def connect(instance: Instance) -> socket.socket | None:
    """A connection to the started instance's server, or None (after recovering a dead one)."""
    sock = try_connect(instance.run) if instance.run.is_dir() else None
    if sock is None:
        recover(instance)
    return sock


def recover(instance: Instance) -> None:
    """Clean up after a server that died: wait for its commit, remove its socket."""
    from libos.run import read_holder

    path = socket_path_of(instance)
    if not os.path.lexists(path):
        return
    fd = os.open(instance.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        holder, _role = read_holder(fd)
        if holder.isdigit() and _alive(int(holder)):
            return  # alive: a server between binding and listening, or closing down
        fcntl.flock(fd, fcntl.LOCK_EX)  # its FUSE server holds it until the commit is done
        if os.path.lexists(path):
            os.unlink(path)
            print(
                f"occlum: the instance's server (pid {holder}) died; cleaned up "
                "(the writable layer keeps what it last committed)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Running (a zombie, not yet reaped by whoever inherited it, is dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def request(instance: Instance, message: dict) -> dict:
    """Send one request to the server; its one-line answer."""
    sock = connect(instance)
    if sock is None:
        raise not_answering(instance)
    answer = _exchange(sock, message)
    if answer is None:
        raise OcclumfsError(f"{instance.root}: the instance's server died while answering")
    return answer


def _exchange(sock: socket.socket, message: dict) -> dict | None:
    """Send one request on ``sock`` and close it; the answer, None when the server hung up."""
    with sock:
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            return read_answer(sock)
        except (BrokenPipeError, ConnectionResetError):
            return None


def not_answering(instance: Instance) -> OcclumfsError:
    """Why nobody answers on the socket: not started (14), or held by a run,
    a mount, a package, a start under way (16)."""
    from libos.run import STOPPING, holder_of

    holder = holder_of(instance)
    if holder is None:
        return NotFoundError(f"{instance.root}: {NOT_STARTED}")
    pid, role = holder
    if role == STOPPING:
        return InUseError(f"{instance.root}: the instance is stopping (pid {pid})")
    role = role or "another process"
    return InUseError(f"{instance.root}: the instance is not started; {role} holds it (pid {pid})")


def describe(instance: Instance) -> str | None:
    """``running (pid N, since T, K programs running)``, or None when not started."""
    sock = connect(instance)
    if sock is None:
        return None
    sock.close()
    answer = raise_if_error(request(instance, {"op": "status"}))
    n = answer["programs"]
    return (
        f"running (pid {answer['pid']}, since {answer['since']}, "
        f"{n} program{'' if n == 1 else 's'} running)"
    )


# -- start ---------------------------------------------------------------------


def start(instance: Instance, image_key=None) -> str:
    """Start the instance's server; the line to print once it is ready."""
    from libos.build import verify_build
    from libos.run import lock_instance, rebase_and_say

    connect(instance)  # a dead server is noticed and cleaned up first
    lock_fd = lock_instance(instance, role="occlum start")
    try:
        build = verify_build(instance, image_key)
        rebase_and_say(build)
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            _daemon(build, lock_fd, ready_w)  # never returns
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            line = ready.readline().decode(errors="replace").rstrip("\n")
    finally:
        os.close(lock_fd)
    kind, _, rest = line.partition(" ")
    if kind == "ok":
        return f"occlum: started (pid {pid}); {rest}"
    if kind == "error":
        code, _, message = rest.partition(" ")
        raise ServerError(message, int(code))
    raise OcclumfsError(f"the instance's server failed to start; see {instance.run / 'occlum.log'}")


def _daemon(build, lock_fd: int, ready_w: int) -> None:
    """The forked server: detach, mount, hold the sandbox, listen, say ready, serve."""
    import trio

    from libos.rootfs import mount_rootfs, unmount_rootfs
    from libos.run import sandbox_for, write_holder
    from libos.sandbox import apply_limits, release_limits
    from libos.server import Server, log

    code = 1
    handle = holder = limits = server = None
    try:
        os.setsid()
        instance = build.instance
        log_fd = os.open(
            instance.run / "occlum.log",
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
            0o600,
        )
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd, target in ((devnull, 0), (devnull, 1), (log_fd, 2)):
            os.dup2(fd, target)
        os.close(devnull)
        os.close(log_fd)
        write_holder(lock_fd, "occlum start")
        handle = mount_rootfs(build)
        sandbox = sandbox_for(build, handle.mountpoint)
        limits = apply_limits(sandbox.limits, f"occlum-{os.getpid()}")
        holder, block_w = sandbox.hold()
        if holder.init_pid is None:
            raise OcclumfsError(f"the sandbox could not be set up; see {instance.run}/occlum.log")
        listener = _listen(instance)
        server = Server(build, handle, sandbox, holder, block_w, listener)
        log(f"started; {limits.describe()}")
        os.write(ready_w, f"ok {limits.describe()}\n".encode())
        os.close(ready_w)
        ready_w = -1
        trio.run(server.main)
        code = 0 if server.result.get("ok") else 1
        log("stopped" if code == 0 else "stopped; the commit FAILED")
    except BaseException as exc:
        if ready_w >= 0:
            exit_code = int(getattr(exc, "exit_code", 1))
            with contextlib.suppress(OSError):
                os.write(ready_w, f"error {exit_code} {exc}\n".encode())
        with contextlib.suppress(BaseException):
            log(f"failed: {exc!r}")
            if holder is not None:
                holder.kill()
                holder.proc.wait()
            if server is not None:
                server.spawner.close()  # out of the cgroups before they are removed
            if limits is not None:
                release_limits(limits)
            if handle is not None and (server is None or not server.unmounted):
                unmount_rootfs(handle)
    finally:
        os._exit(code)


def _listen(instance: Instance) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path_of(instance))
    with in_run_dir(instance.run) as address:
        listener.bind(address)
    os.chmod(socket_path_of(instance), 0o600)
    listener.listen(64)
    return listener


# -- stop, kill ----------------------------------------------------------------


def stop(instance: Instance, timeout: float = DEFAULT_STOP_TIMEOUT, *, kill: bool = False) -> None:
    """Stop the started instance; raise when its last commit failed.

    A stop or kill that finds the server already stopping (after another stop or
    kill) waits for it, as Docker does; only the first one learns whether the
    commit failed."""
    from libos.run import STOPPING, holder_of, lock_instance

    message = {"op": "kill"} if kill else {"op": "stop", "timeout": timeout}
    sock = connect(instance)
    answer = None if sock is None else _exchange(sock, message)
    if answer is None:
        holder = holder_of(instance)
        if holder is None or holder[1] != STOPPING:
            raise not_answering(instance)
    elif "error" in answer:
        raise NotSavedError(answer["error"])
    lock_fd = lock_instance(instance, wait=True, role="occlum stop")  # the server has exited
    os.close(lock_fd)
