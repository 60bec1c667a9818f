"""The started instance's side of libos/spawner.py: :class:`Spawner` starts it and
hands it each ``occlum exec``'s program; :class:`_Spawned` is one such program.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import replace

from libos import spawner
from libos.sandbox import Sandbox, SandboxProcess, _limits_spec
from libos.spawner import PIDNS_FD, STATUS_FD
from occlumfs.errors import OcclumfsError


class Spawner:
    """Programs started by libos/spawner.py, a process that joined ``sandbox``'s
    cgroups once: no cgroup move and no fork of this (large) process per program.

    ``sandbox`` is a :meth:`Sandbox.joined` one; :meth:`spawn` is safe from
    several threads at once. A spawner that died (killed, or by the sandbox's
    memory limit: it counts against it) is replaced by the next :meth:`spawn`,
    and ``log`` told. :meth:`close` ends the spawner (call it once every
    program is gone, before :func:`release_limits`).
    """

    def __init__(self, sandbox: Sandbox, log=None) -> None:
        self.sandbox = replace(sandbox, pidns_fd=PIDNS_FD)  # its number in bubblewrap
        self.pidns_fd = sandbox.pidns_fd
        self.limits = json.dumps(_limits_spec(sandbox.limits))
        self.log = log
        self.lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pass_fds = (theirs.fileno(), self.pidns_fd)
        argv = [sys.executable, "-I", "-S", spawner.__file__, *map(str, pass_fds), self.limits]
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=pass_fds,
            )
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()

    def _send(self, fds: list[int]) -> None:
        """Hand one request's fds to the spawner, first replacing one that died."""
        with self.lock:
            for attempt in (1, 2):
                if self.proc.poll() is not None:
                    if self.log is not None:
                        self.log(
                            f"the spawner (pid {self.proc.pid}) died ({self.proc.returncode}); "
                            "starting another"
                        )
                    self.sock.close()
                    self._start()
                try:
                    socket.send_fds(self.sock, [b"x"], fds)
                    return
                except OSError:
                    if attempt == 2:
                        raise
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=5)  # it is dying: its socket is closed

    def spawn(
        self, command: list[str], env: dict[str, str], *, cwd: str, stdin: int, stdout: int,
        stderr: int,
    ) -> SandboxProcess:  # fmt: skip
        """As :meth:`Sandbox.spawn`, with the given stdio."""
        argv = self.sandbox.argv(command, cwd, STATUS_FD)
        status_r, status_w = os.pipe()
        mine, theirs = socket.socketpair()
        try:
            self._send([theirs.fileno(), stdin, stdout, stderr, status_w])
            stream = mine.makefile("rwb")
            stream.write(json.dumps({"argv": argv, "env": env}).encode() + b"\n")
            stream.flush()
            answer = json.loads(stream.readline() or b"{}")
            if "pid" not in answer:
                raise OcclumfsError(answer.get("error", "the instance's spawner is gone"))
        except (OSError, ValueError) as exc:
            mine.close()
            os.close(status_r)
            raise OcclumfsError(f"the instance's spawner failed: {exc}") from None
        except BaseException:
            mine.close()
            os.close(status_r)
            raise
        finally:
            theirs.close()
            os.close(status_w)
        return SandboxProcess(_Spawned(int(answer["pid"]), mine, stream), status_r)

    def close(self) -> None:
        self.sock.close()
        self.proc.wait()


class _Spawned:
    """A spawner's child, as much of :class:`subprocess.Popen` as SandboxProcess uses."""

    def __init__(self, pid: int, sock: socket.socket, stream) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._sock, self._stream = sock, stream

    def wait(self) -> int:
        if self.returncode is None:
            try:
                line = self._stream.readline()
                if not line:
                    raise OcclumfsError("the instance's spawner died; the program's status is lost")
                self.returncode = int(json.loads(line)["status"])
            finally:
                self._stream.close()
                self._sock.close()
        return self.returncode
