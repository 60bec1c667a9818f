"""The started instance's spawner: a small process inside the sandbox's cgroups that
starts bubblewrap for each ``occlum exec``.

Moving a process into a cgroup waits for an RCU grace period (~14 ms on the
development machine, whatever the process), and forking the large server with
a ``preexec_fn`` costs a few more. This process joins the sandbox's cgroups
(or takes its rlimits) once, when ``occlum start`` starts it, and every
bubblewrap it starts with ``posix_spawn`` inherits them. It is one task of
the sandbox's task limit (a single thread), and its memory (a few MB) counts
against the sandbox's memory limit.

It is run as ``python -I -S spawner.py CONTROL_FD PIDNS_FD LIMITS`` and
imports only the standard library; it joins the cgroups (or sets the rlimits)
itself once started, so the memory that starting Python took stays charged
outside the sandbox. The server (libos/spawning.py, :class:`Spawner`) sends
one SEQPACKET message per program: a byte, with the fds of a reply socket,
the program's stdin, stdout and stderr and bubblewrap's status pipe. The
spawner reads the request from the reply socket (one JSON line: bubblewrap's
argv and environment), starts it with those fds as 0, 1, 2 and
:data:`STATUS_FD` (and the pid namespace's fd as :data:`PIDNS_FD`), answers
``{"pid": N}`` or ``{"error": "..."}``, and once it has ended
``{"status": N}`` (as ``Popen.returncode``). When the control socket closes
(the server ended or died), the spawner exits; the programs end with the
sandbox's pid namespace (its init, held by the server, dies with the server).
"""

import array
import contextlib
import fcntl
import json
import os
import resource
import select
import signal
import socket
import sys

STATUS_FD = 3
PIDNS_FD = 4
FIRST_FREE_FD = 10
RECEIVED = 5  # reply socket, stdin, stdout, stderr, status pipe
# Ignored here (the server decides when the spawner ends), default in the programs.
IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
DEFAULTS = (*IGNORED, signal.SIGPIPE, signal.SIGXFSZ)


def enter_limits(spec: dict) -> None:
    """Join the cgroups of ``spec``, and set its rlimits (libos/sandbox.py makes it)."""
    for path in spec["cgroups"]:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    for kind, value in (
        (resource.RLIMIT_AS, spec["memory"]),
        (resource.RLIMIT_NPROC, spec["tasks"]),
    ):
        if value:
            resource.setrlimit(kind, (value, value))
    if spec["stack"]:
        _soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
        want = spec["stack"] if hard == resource.RLIM_INFINITY else min(spec["stack"], hard)
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


def _start(fds: list[int], pidns: int) -> tuple[int, socket.socket] | None:
    """Start one program; its pid and reply socket (None when it could not start)."""
    reply, stdin, stdout, stderr, status = fds
    sock = socket.socket(fileno=reply)
    pid = None
    try:
        with sock.makefile("rb") as stream:
            request = json.loads(stream.readline())
        argv = request["argv"]
        pid = os.posix_spawn(
            argv[0],
            argv,
            request["env"],
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin, 0),
                (os.POSIX_SPAWN_DUP2, stdout, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
                (os.POSIX_SPAWN_DUP2, status, STATUS_FD),
                (os.POSIX_SPAWN_DUP2, pidns, PIDNS_FD),
            ],
            setpgroup=0,  # its own group: the terminal's Ctrl-C is forwarded, not sent
            setsigdef=DEFAULTS,
            setsigmask=(),
        )
        answer = {"pid": pid}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        answer = {"error": f"could not start bubblewrap: {exc}"}
    finally:
        for fd in (stdin, stdout, stderr, status):
            os.close(fd)
    with contextlib.suppress(OSError):  # else the server's worker is gone; reaped anyway
        sock.sendall(json.dumps(answer).encode() + b"\n")
    if pid is None:
        sock.close()
        return None
    return pid, sock


def _receive(sock: socket.socket) -> list[int] | None:
    """The fds of one request (empty when malformed), or None once the server is gone."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        1, socket.CMSG_SPACE(RECEIVED * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        return None
    if len(fds) != RECEIVED:
        for fd in fds:
            os.close(fd)
        return []
    return list(fds)


def main(control_fd: int, pidns_fd: int, limits: dict) -> None:
    # Limits last: what starting Python took stays charged where the server is;
    # what the spawner allocates from here on, and every program, to the sandbox.
    enter_limits(limits)
    for signum in IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    # Our fds out of the way of the ones the children get (0-4), and placeholders
    # below FIRST_FREE_FD, so that every fd received lands above them too.
    control, pidns = _move_up(control_fd), _move_up(pidns_fd)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    for fd in range(3, FIRST_FREE_FD):
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(null, fd, inheritable=False)
    waiting: dict[int, tuple[int, socket.socket]] = {}  # pidfd: (pid, reply socket)
    poller = select.poll()
    poller.register(control, select.POLLIN)
    with socket.socket(fileno=control) as sock:
        while True:
            for fd, _events in poller.poll():
                if fd == control:
                    fds = _receive(sock)
                    if fds is None:
                        return  # the server is gone
                    started = _start(fds, pidns) if fds else None
                    if started is not None:
                        pidfd = os.pidfd_open(started[0])
                        waiting[pidfd] = started
                        poller.register(pidfd, select.POLLIN)
                    continue
                pid, reply = waiting.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                _pid, wait_status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(wait_status)
                with contextlib.suppress(OSError):
                    reply.sendall(json.dumps({"status": code}).encode() + b"\n")
                reply.close()


def _move_up(fd: int) -> int:
    """``fd`` at a number >= FIRST_FREE_FD, close-on-exec; the original closed."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FIRST_FREE_FD)
    os.close(fd)
    return moved


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
