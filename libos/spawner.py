"""The started instance's spawner: a small process inside the sandbox's cgroups that
starts bubblewrap for each ``occlum exec``.

Moving a process into a cgroup waits for an RCU grace period (~14 ms on the
development machine, whatever the process), and forking the large server with
a ``preexec_fn`` costs a few more. This process joins the sandbox's cgroups
(or takes its rlimits) once, when ``occlum start`` starts it, and every
bubblewrap it starts with ``posix_spawn`` inherits them. Its memory (a few
MB) counts against the sandbox's limit, as bubblewrap's own did.

It is run as ``python -I -S spawner.py CONTROL_FD`` and imports only the
standard library. The server (libos/sandbox.py, :class:`Spawner`) sends one
SEQPACKET message per program: a byte, with the fds of a reply socket, the
program's stdin, stdout and stderr and bubblewrap's status pipe. A thread reads
the request from the reply socket (one JSON line: bubblewrap's argv and
environment), starts it with those fds as 0, 1, 2 and :data:`STATUS_FD`
(and the pid namespace's fd, :data:`PIDNS_FD`), answers ``{"pid": N}`` or
``{"error": "..."}``, waits for it, and answers ``{"status": N}`` (as
``Popen.returncode``). The thread that spawns also waits: bubblewrap's
``--die-with-parent`` follows it. When the control socket closes (the server
ended or died), the spawner exits, and bubblewrap's programs with it.
"""

import array
import fcntl
import json
import os
import signal
import socket
import sys
import threading

STATUS_FD = 3
PIDNS_FD = 4
FIRST_FREE_FD = 10
RECEIVED = 5  # reply socket, stdin, stdout, stderr, status pipe
# Ignored here (the server decides when the spawner ends), default in the programs.
IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
DEFAULTS = (*IGNORED, signal.SIGPIPE, signal.SIGXFSZ)


def _serve_one(fds: list[int], pidns: int) -> None:
    reply, stdin, stdout, stderr, status = fds
    with socket.socket(fileno=reply) as sock, sock.makefile("rwb") as stream:
        pid = None
        try:
            request = json.loads(stream.readline())
            actions = [
                (os.POSIX_SPAWN_DUP2, stdin, 0),
                (os.POSIX_SPAWN_DUP2, stdout, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
                (os.POSIX_SPAWN_DUP2, status, STATUS_FD),
                (os.POSIX_SPAWN_DUP2, pidns, PIDNS_FD),
            ]
            argv = request["argv"]
            pid = os.posix_spawn(
                argv[0],
                argv,
                request["env"],
                file_actions=actions,
                setpgroup=0,  # as before: the terminal's Ctrl-C is forwarded, not sent
                setsigdef=DEFAULTS,
                setsigmask=(),
            )
            answer = {"pid": pid}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            answer = {"error": f"could not start bubblewrap: {exc}"}
        finally:
            for fd in (stdin, stdout, stderr, status):
                os.close(fd)
        stream.write(json.dumps(answer).encode() + b"\n")
        stream.flush()
        if pid is not None:
            _pid, wait_status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(wait_status)
            stream.write(json.dumps({"status": code}).encode() + b"\n")
            stream.flush()


def main(control_fd: int, pidns_fd: int) -> None:
    for signum in IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    # Known fd numbers out of the way of the fds the children get (0-4), and
    # placeholders below them, so that every fd received lands above them too.
    control, pidns = _move_up(control_fd), _move_up(pidns_fd)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    for fd in range(3, FIRST_FREE_FD):
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(null, fd, inheritable=False)
    threading.stack_size(256 * 1024)
    with socket.socket(fileno=control) as sock:
        while True:
            fds_size = socket.CMSG_SPACE(RECEIVED * array.array("i").itemsize)
            data, ancdata, _flags, _addr = sock.recvmsg(1, fds_size, socket.MSG_CMSG_CLOEXEC)
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not data:  # the server is gone
                return
            if len(fds) != RECEIVED:
                for fd in fds:
                    os.close(fd)
                continue
            threading.Thread(target=_serve_one, args=(list(fds), pidns), daemon=True).start()


def _move_up(fd: int) -> int:
    """``fd`` at a number >= FIRST_FREE_FD, close-on-exec; the original closed."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FIRST_FREE_FD)
    os.close(fd)
    return moved


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
