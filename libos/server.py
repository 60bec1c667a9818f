"""The server of a started instance (``occlum start``): one sandbox, many programs.

``occlum start`` verifies the build and forks this server, which mounts the
union once, makes an empty sandbox that stays up (:meth:`Sandbox.hold`), and
serves ``run/occlum.sock`` with trio: one task per connection. An exec's
program is spawned into the held sandbox's pid namespace
(:meth:`Sandbox.joined`) by the spawner (libos/spawner.py, a process already
in the sandbox's cgroups) with the stdin/stdout/stderr the client handed over
(SCM_RIGHTS); its status goes back on the connection. Stop and kill signal
the programs, end the sandbox, and commit and unmount before they answer.

The protocol is JSON lines (libos/protocol.py and libos/control.py are the client):
``{"op": "exec", "argv": [...], "env": {...}}`` with three fds, then
``{"signal": N}`` lines to forward; answers ``{"status": N}`` or
``{"error": "...", "code": N}``. ``{"op": "status"}``, ``{"op": "stop",
"timeout": S}`` and ``{"op": "kill"}`` answer one line.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import posixpath
import signal
import socket
import struct
import sys
import time

import trio

from libos.build import VerifiedBuild
from libos.execcheck import check_executable
from libos.protocol import DEFAULT_STOP_TIMEOUT, SOCKET_NAME
from libos.rootfs import RootfsHandle, is_dir_inside, unmount_rootfs
from libos.run import STOPPING, check_entry_point, covered_paths, program_env, write_holder
from libos.sandbox import Sandbox, SandboxProcess, release_limits
from libos.spawning import Spawner
from occlumfs.errors import InUseError, NotFoundError, OcclumfsError, UsageError

MAX_FDS = 3


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} occlum server: {message}", file=sys.stderr)


class _Conn:
    """One client connection: JSON lines, the first of which may carry fds."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []

    async def read(self) -> dict | None:
        while b"\n" not in self.buf:
            data, ancdata, _flags, _addr = await self.sock.recvmsg(
                65536, socket.CMSG_SPACE(4 * MAX_FDS), socket.MSG_CMSG_CLOEXEC
            )
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self.fds += list(fds)
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    async def send(self, message: dict) -> None:
        data = json.dumps(message).encode() + b"\n"
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            while data:
                data = data[await self.sock.send(data) :]

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


class _Exec:
    """A program run by ``occlum exec``; signals may come before it has started."""

    def __init__(self) -> None:
        self.proc: SandboxProcess | None = None
        self.pending: list[int] = []

    def signal(self, signum: int) -> None:
        if self.proc is None:
            self.pending.append(signum)
        else:
            self.proc.signal(signum, joined=True)

    def started(self, proc: SandboxProcess) -> None:
        self.proc = proc
        for signum in self.pending:
            proc.signal(signum, joined=True)


class Server:
    def __init__(
        self,
        build: VerifiedBuild,
        handle: RootfsHandle,
        sandbox: Sandbox,
        holder: SandboxProcess,
        block_w: int,
        listener: socket.socket,
    ) -> None:
        self.build = build
        self.handle = handle
        self.sandbox = sandbox
        self.joined = sandbox.joined(holder)
        self.spawner = Spawner(self.joined, log)
        self.holder = holder
        self.block_w = block_w
        self.listener = listener
        self.since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.running: set[_Exec] = set()
        self.stopping = False
        self.unmounted = False
        self.result: dict = {}

    # -- the whole life of the server --------------------------------------

    async def main(self) -> None:
        self.idle = trio.Event()
        self.idle.set()
        self.holder_gone = trio.Event()
        self.shut = trio.Event()  # the sandbox is gone and the layer committed
        self.done = trio.Event()  # the server may exit
        listener = trio.socket.from_stdlib_socket(self.listener)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept, listener, nursery)
            nursery.start_soon(self._watch_holder)
            nursery.start_soon(self._watch_signals)
            await self.done.wait()
            nursery.cancel_scope.cancel()

    async def _accept(self, listener, nursery) -> None:
        while True:
            sock, _addr = await listener.accept()
            nursery.start_soon(self._serve, sock)

    async def _watch_holder(self) -> None:
        await trio.to_thread.run_sync(self.holder.proc.wait, abandon_on_cancel=True)
        self.holder_gone.set()
        if not self.stopping:
            log("the sandbox ended on its own; stopping")
            await self.shutdown(0, kill=True)
            self.done.set()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log(f"{signal.Signals(signum).name}: stopping")
                await self.shutdown(DEFAULT_STOP_TIMEOUT, kill=False)
                self.done.set()
                return

    # -- one connection ----------------------------------------------------

    async def _serve(self, sock) -> None:
        with sock:
            _pid, uid, _gid = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )
            conn = _Conn(sock)
            try:
                if uid not in (0, os.getuid()):
                    return
                request = await conn.read()
                if request is None:
                    return
                op = request.get("op")
                if op == "exec":
                    await self._exec(conn, request)
                elif op == "status":
                    await conn.send(
                        {"pid": os.getpid(), "since": self.since, "programs": len(self.running)}
                    )
                elif op in ("stop", "kill"):
                    timeout = request.get("timeout", DEFAULT_STOP_TIMEOUT)
                    if not isinstance(timeout, (int, float)) or timeout < 0:
                        timeout = DEFAULT_STOP_TIMEOUT
                    await conn.send(await self.shutdown(timeout, kill=op == "kill"))
                    self.done.set()
                else:
                    await conn.send({"error": f"unknown request {op!r}", "code": 2})
            except Exception as exc:  # one bad request must not end the instance
                log(f"a request failed: {exc!r}")
                await conn.send({"error": f"the server could not serve the request: {exc}"})
            finally:
                conn.close_fds()

    def _check_exec(self, request: dict, fds: list[int]) -> tuple[list[str], str, dict[str, str]]:
        """The program's argv, its directory and the variables given with -e, checked."""
        if self.stopping:
            raise InUseError(f"{self.build.instance.root}: the instance is stopping")
        argv = request.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise UsageError("exec: no program given")
        if len(fds) != 3:
            raise UsageError("exec: stdin, stdout and stderr must be handed over")
        program = argv[0]
        check_entry_point(program, self.build.config.entry_points)
        # access(F_OK), not lstat: no GETATTR for attributes the program's exec made stale.
        inside = self.handle.mountpoint / posixpath.relpath(program, "/")
        if not os.access(inside, os.F_OK, follow_symlinks=False):
            raise NotFoundError(f"{program}: no such program in the instance")
        cwd = request.get("cwd") or "/"
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise UsageError(f"exec: --cwd {cwd}: not an absolute path inside the instance")
        if not is_dir_inside(self.handle.mountpoint, cwd):
            raise NotFoundError(f"exec: --cwd {cwd}: no such directory in the instance")
        given = request.get("set") or {}
        if not isinstance(given, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in given.items()
        ):
            raise UsageError("exec: malformed -e variables")
        for name in given:
            if name not in self.build.config.env_untrusted:
                raise UsageError(
                    f"exec: -e {name}: not named in env.untrusted of Occlum.json, "
                    "so the host may not set it"
                )
        return argv, cwd, given

    async def _exec(self, conn: _Conn, request: dict) -> None:
        fds, conn.fds = conn.fds, []
        try:
            argv, cwd, given = self._check_exec(request, fds)
        except OcclumfsError as exc:
            for fd in fds:
                os.close(fd)
            await conn.send({"error": str(exc), "code": int(exc.exit_code)})
            return
        host_env = request.get("env")
        host_env = host_env if isinstance(host_env, dict) else {}
        env = program_env(self.build.config, {**host_env, **given})
        job = _Exec()
        self.running.add(job)
        if self.idle.is_set():
            self.idle = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, conn, job)
                try:
                    answer = {
                        "status": await trio.to_thread.run_sync(self._run, job, argv, env, cwd, fds)
                    }
                except OcclumfsError as exc:
                    answer = {"error": str(exc), "code": int(exc.exit_code)}
                nursery.cancel_scope.cancel()
        finally:
            self.running.discard(job)
            if not self.running:
                self.idle.set()
        await conn.send(answer)

    def _run(
        self, job: _Exec, argv: list[str], env: dict[str, str], cwd: str, fds: list[int]
    ) -> int:
        """In a worker thread: spawn (libos/spawner.py starts bubblewrap), then wait."""
        try:
            proc = self.spawner.spawn(
                argv, env, cwd=cwd, stdin=fds[0], stdout=fds[1], stderr=fds[2]
            )
        finally:
            for fd in fds:
                os.close(fd)
        job.started(proc)
        status = proc.wait()
        if status == 1:  # bubblewrap's own status when its exec failed: say why, if so
            check_executable(self.handle.mountpoint, argv[0], covered_paths(self.sandbox))
        return status

    async def _forward(self, conn: _Conn, job: _Exec) -> None:
        """Signals from ``occlum exec`` to its program; a vanished client kills it."""
        while True:
            try:
                message = await conn.read()
            except OSError:  # reset by a client that died
                message = None
            if message is None:
                job.signal(signal.SIGKILL)
                return
            signum = message.get("signal")
            if isinstance(signum, int) and 0 < signum < signal.NSIG:
                job.signal(signum)

    # -- stop and kill -----------------------------------------------------

    async def shutdown(self, timeout: float, *, kill: bool) -> dict:
        """End every program, the sandbox, and commit; what to answer the client."""
        if self.stopping:
            await self.shut.wait()
            return self.result
        self.stopping = True
        _say_stopping(self.build.instance)  # before the socket goes: see control.stop
        with contextlib.suppress(OSError):
            os.unlink(socket_path_of(self.build.instance))
        self.listener.close()
        if not kill:
            for job in list(self.running):
                job.signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                await self.idle.wait()
        self.holder.kill()
        await self.idle.wait()
        await self.holder_gone.wait()
        os.close(self.block_w)
        await trio.to_thread.run_sync(self.spawner.close)
        os.close(self.joined.pidns_fd)
        release_limits(self.sandbox.limits)
        try:
            await trio.to_thread.run_sync(unmount_rootfs, self.handle)
            self.result = {"ok": True}
        except OcclumfsError as exc:
            log(str(exc))
            self.result = {"error": str(exc), "code": 17}
        self.unmounted = True
        self.shut.set()
        return self.result


def _say_stopping(instance) -> None:
    """Mark the instance lock (which this process holds) as stopping."""
    with contextlib.suppress(OSError):
        fd = os.open(instance.lock, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            write_holder(fd, STOPPING)
        finally:
            os.close(fd)


def socket_path_of(instance) -> str:
    return str(instance.run / SOCKET_NAME)
