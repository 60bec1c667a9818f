"""The simulated enclave: a bubblewrap sandbox whose ``/`` is a mounted rootfs.

The sandbox has its own mount, pid, ipc and uts namespaces, the given
directory (the union served over FUSE by a server outside it) as ``/``,
``/proc``, a minimal ``/dev`` (null, zero, full, random, urandom, tty, pts,
shm), a tmpfs ``/tmp``, and the hostfs directories bound where the config
says; nothing else of the host is visible. All capabilities are dropped and
bubblewrap sets no_new_privs. The network namespace is the host's, as
Occlum's is.

Resource limits go to a cgroup (v2 if the host has a unified hierarchy with
the controllers delegated, else v1's memory and pids controllers) created
for this sandbox, else to rlimits on its processes; :attr:`Limits.how` says
which. The host's root can still read the sandbox's memory: see
docs/threat-model.md.

:class:`Sandbox` is the reusable part: ``spawn`` starts one program (stdio
inherited unless other fds are given) and returns a :class:`SandboxProcess`
to signal and wait for; ``occlum run`` spawns once, ``occlum start``/``exec``
(issue 10) can keep a sandbox per instance and spawn many.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from libos.spawner import STATUS_FD, enter_limits
from occlumfs.errors import NotFoundError, OcclumfsError

CGROUP_ROOT = Path("/sys/fs/cgroup")
HIDDEN = ".occlum"  # instance secrets, hidden when the instance dir is bound as /host


@dataclass
class Limits:
    """Limits for the whole sandbox: bytes of memory and number of tasks."""

    memory: int | None = None
    tasks: int | None = None
    stack: int | None = None
    how: str = "none"
    cgroups: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        # 0 (or no key) is no limit, as Docker's --memory 0 and --pids-limit 0: say so.
        memory = f"memory {self.memory >> 20}MB" if self.memory else "no memory limit"
        tasks = f"{self.tasks} tasks" if self.tasks else "no task limit"
        return f"resource limits via {self.how} ({memory}, {tasks})"


def _own_cgroup(controller: str) -> Path | None:
    """This process's cgroup directory for ``controller`` ('' = the v2 unified one)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _num, names, path = line.split(":", 2)
        if (controller == "" and names == "") or controller in names.split(","):
            base = CGROUP_ROOT / controller if controller else _unified_root()
            return base / path.lstrip("/") if base else None
    return None


def _unified_root() -> Path | None:
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return CGROUP_ROOT
    if (CGROUP_ROOT / "unified" / "cgroup.controllers").exists():
        return CGROUP_ROOT / "unified"
    return None


def _sweep_stale(parent: Path) -> None:
    """Remove the empty cgroups of sandboxes whose owner died (a SIGKILLed server),
    or that were still emptying when their run released them."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            owner = entry.name.removeprefix("occlum-")
            stale = owner.isdigit() and not Path(f"/proc/{owner}").exists()
            if entry.name.startswith("occlum-") and stale:
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)  # refused while a process is in it


def _make_cgroup(parent: Path | None, name: str, files: dict[str, str]) -> Path | None:
    if parent is None or not parent.is_dir():
        return None
    _sweep_stale(parent)
    path = parent / name
    try:
        path.mkdir()
    except OSError:
        return None
    try:
        for key, value in files.items():
            (path / key).write_text(value)
    except OSError:
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    return path


def apply_limits(limits: Limits, name: str) -> Limits:
    """Create cgroups for ``limits`` (v2, else v1), else fall back to rlimits.

    ``$OCCLUM_LIMITS=rlimits`` skips the cgroups (a host whose cgroups are
    managed by something else, and the tests of the fallback).
    """
    if not limits.memory and not limits.tasks:
        limits.how = "none"
        return limits
    if os.environ.get("OCCLUM_LIMITS") == "rlimits":
        limits.how = "rlimits"
        return limits
    v2 = _own_cgroup("")
    if v2 is not None and _unified_root() is not None:
        try:
            delegated = set((v2 / "cgroup.subtree_control").read_text().split())
        except OSError:
            delegated = set()
        if {"memory", "pids"} <= delegated:
            files = {}
            if limits.memory:
                files["memory.max"] = str(limits.memory)
            if limits.tasks:
                files["pids.max"] = str(limits.tasks)
            path = _make_cgroup(v2, name, files)
            if path is not None:
                limits.how, limits.cgroups = "cgroup v2", [path]
                return limits
    made = []
    if limits.memory:
        mem = _make_cgroup(
            _own_cgroup("memory"), name, {"memory.limit_in_bytes": str(limits.memory)}
        )
        made.append(mem)
    if limits.tasks:
        made.append(_make_cgroup(_own_cgroup("pids"), name, {"pids.max": str(limits.tasks)}))
    if made and all(made):
        limits.how, limits.cgroups = "cgroup v1", made
        return limits
    for path in made:
        if path is not None:
            with contextlib.suppress(OSError):
                path.rmdir()
    limits.how = "rlimits"
    return limits


def release_limits(limits: Limits) -> None:
    for path in limits.cgroups:
        with contextlib.suppress(OSError):
            path.rmdir()
    limits.cgroups = []


def _enter_child(limits: Limits, reap: bool = False) -> None:
    """In bubblewrap's process, before exec: its own process group, and the limits.

    Its own group: the terminal's Ctrl-C goes to the caller's group only, not
    to bubblewrap's monitor (which dies of SIGINT and takes the sandbox with
    it); the caller forwards the signal to the programs instead.
    """
    os.setpgid(0, 0)
    if reap:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    _enter_limits(limits)


def _enter_limits(limits: Limits) -> None:
    """Join the cgroups, or set rlimits (imports nothing: it runs in a forked child)."""
    enter_limits(_limits_spec(limits))


def _limits_spec(limits: Limits) -> dict:
    """``limits`` as libos/spawner.py takes them (JSON: it imports nothing of ours)."""
    rlimits = limits.how == "rlimits"
    return {
        "cgroups": [str(path) for path in limits.cgroups],
        "memory": limits.memory if rlimits else None,
        "tasks": limits.tasks if rlimits else None,
        "stack": limits.stack,
    }


@dataclass
class Sandbox:
    """What a sandbox looks like; the same for every program spawned in it."""

    root: Path
    binds: list[tuple[Path, str]] = field(default_factory=list)  # (host dir, inside)
    proc: bool = True
    dev: bool = True
    tmpfs: list[str] = field(default_factory=lambda: ["/tmp"])
    hostname: str = "occlum"
    limits: Limits = field(default_factory=Limits)
    pidns_fd: int | None = None  # join this pid namespace instead of making one

    def joined(self, first: SandboxProcess) -> Sandbox:
        """The same sandbox for another program, in ``first``'s pid namespace.

        ``occlum exec`` runs each program this way: the same root, binds and
        limits, and one pid namespace, so programs see and can signal each
        other. The caller closes ``pidns_fd`` when done.
        """
        fd = os.open(f"/proc/{first.init_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        return replace(self, pidns_fd=fd)

    def argv(
        self,
        command: list[str],
        cwd: str = "/",
        status_fd: int | None = None,
        block_fd: int | None = None,
    ) -> list[str]:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise NotFoundError("bwrap not found (Debian package: bubblewrap)")
        # Joining a pid namespace, bubblewrap forks through an intermediate process
        # that exits at once; with --die-with-parent its program SIGKILLs itself
        # when that exit comes after the program's prctl (under load: 2 runs in
        # 4,500, status 137). A joined program ends with the namespace's init.
        if self.pidns_fd is None:
            pid = ["--unshare-pid", "--die-with-parent"]
        else:
            pid = ["--pidns", str(self.pidns_fd)]
        args = [
            bwrap,
            *pid,
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            self.hostname,
            "--new-session",
            "--cap-drop",
            "ALL",
            "--bind",
            str(self.root),
            "/",
        ]
        if self.proc:
            args += ["--proc", "/proc"]
        # Shared scratch is world-writable and sticky (1777), as on any Linux:
        # bubblewrap's own are 0755.
        if self.dev:
            args += ["--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm"]
        for path in self.tmpfs:
            args += ["--perms", "1777", "--tmpfs", path]
        for host, inside in self.binds:
            args += ["--bind", str(host), inside]
            if (host / HIDDEN).is_dir():
                args += ["--tmpfs", f"{inside.rstrip('/')}/{HIDDEN}"]
        if status_fd is not None:
            args += ["--json-status-fd", str(status_fd)]
        if block_fd is not None:
            args += ["--block-fd", str(block_fd)]
        args += ["--chdir", cwd, "--", *command]
        return args

    def spawn(
        self,
        command: list[str],
        env: dict[str, str],
        *,
        cwd: str = "/",
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        block_fd: int | None = None,
        reap: bool = False,
    ) -> SandboxProcess:
        """Start ``command`` in the sandbox; stdio is inherited unless fds are given.

        ``block_fd``: the sandbox is set up, then waits for data (or EOF) on
        this fd before it runs ``command``. ``reap``: bubblewrap starts with
        SIGCHLD ignored, so the kernel reaps the children of its processes,
        the sandbox's init included, as they exit (see :meth:`hold`).
        """
        status_r, status_w = os.pipe()
        keep = [fd for fd in (status_w, self.pidns_fd, block_fd) if fd is not None]
        try:
            proc = subprocess.Popen(
                self.argv(command, cwd, status_w, block_fd),
                env=env,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=keep,
                preexec_fn=lambda: _enter_child(self.limits, reap),
            )
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        return SandboxProcess(proc, status_r)

    def prepare(self, command: list[str], env: dict[str, str]) -> Prepared:
        """Bubblewrap's process for ``command``, forked now, started later.

        It takes its own process group and joins the limits at once (a
        cgroup move waits for an RCU grace period, ~14 ms on the development
        machine, whatever the process), then waits: :meth:`Prepared.start`
        lets it exec bubblewrap, :meth:`Prepared.cancel` ends it. ``occlum
        run`` mounts the root in the meantime. stdio is inherited.
        """
        argv = self.argv(command, "/", STATUS_FD)
        spec = _limits_spec(self.limits)
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        status_r, status_w = os.pipe()
        fd_limit = os.sysconf("SC_OPEN_MAX")
        pid = os.fork()
        if pid == 0:  # imports nothing, runs no handler: it only waits and execs
            try:
                for fd in (go_w, ready_r, status_r):
                    os.close(fd)
                os.setpgid(0, 0)
                for signum in (signal.SIGPIPE, signal.SIGXFSZ):
                    signal.signal(signum, signal.SIG_DFL)
                try:
                    enter_limits(spec)
                except OSError as exc:
                    os.write(ready_w, f"cannot join the sandbox's limits: {exc}".encode())
                    os._exit(1)
                os.close(ready_w)
                if os.read(go_r, 1) == b"1":
                    if status_w == STATUS_FD:
                        os.set_inheritable(status_w, True)
                    else:
                        os.dup2(status_w, STATUS_FD)  # inheritable
                    # Only stdio goes in: whatever else the caller left open (a
                    # directory fd opens the host's files via /proc/self/fd).
                    os.closerange(3, STATUS_FD)
                    os.closerange(STATUS_FD + 1, fd_limit)
                    try:
                        os.execve(argv[0], argv, env)
                    except (OSError, ValueError) as exc:  # E2BIG: past the stack's quarter
                        problem = {"error": f"could not start bubblewrap: {exc}"}
                        os.write(STATUS_FD, json.dumps(problem).encode() + b"\n")
            finally:
                os._exit(127)
        for fd in (go_r, ready_w, status_w):
            os.close(fd)
        return Prepared(pid, go_w, ready_r, status_r)

    def hold(self) -> tuple[SandboxProcess, int]:
        """An empty sandbox that stays up: its pid namespace is for :meth:`joined`.

        Its one process waits on a pipe whose write end (returned) the caller
        keeps; when that closes (the caller died), it execs ``/dev/null``,
        which fails, and the sandbox ends with everything in it.

        That process is the namespace's init: a program's orphans (a daemon,
        ``cmd &`` in a script that exits) become its children, and it waits
        on the pipe, never for them. It ignores SIGCHLD (``reap``), so the
        kernel reaps them as they exit: no zombies hold the sandbox's task
        limit until ``occlum stop``. Its bubblewrap monitor, ignoring it too,
        cannot learn that the init ended: :class:`_HeldMonitor` watches the
        init instead.
        """
        block_r, block_w = os.pipe()
        try:
            holder = self.spawn(
                ["/dev/null"],
                {},
                stdin=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                block_fd=block_r,
                reap=True,
            )
        except BaseException:
            os.close(block_w)
            raise
        finally:
            os.close(block_r)
        holder.proc = _HeldMonitor(holder.proc, holder.init_pid)
        return holder, block_w


class _HeldMonitor:
    """The held sandbox's bubblewrap, as much of :class:`subprocess.Popen` as is used:
    its end is its init's (through a pidfd); the monitor is then ended."""

    def __init__(self, proc: subprocess.Popen, init_pid: int | None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.pidfd = None
        if init_pid is not None:
            with contextlib.suppress(ProcessLookupError):  # already gone
                self.pidfd = os.pidfd_open(init_pid)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int:
        if self.pidfd is not None:
            select.select([self.pidfd], [], [])  # readable once the init has exited
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()  # it waits for a SIGCHLD it will never see
        code = self.proc.wait()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        return code


class Prepared:
    """A forked, waiting bubblewrap process (:meth:`Sandbox.prepare`)."""

    def __init__(self, pid: int, go: int, ready: int, status: int) -> None:
        self.proc = _Child(pid)
        self._go, self._ready, self._status = go, ready, status

    def start(self) -> SandboxProcess:
        """Let it exec bubblewrap (once it is in the limits); the running sandbox."""
        with os.fdopen(self._ready, "rb") as ready:
            problem = ready.read()  # empty: it closed its end, in the limits
        told = False
        try:
            if not problem:
                with contextlib.suppress(OSError):  # it died: said below
                    told = os.write(self._go, b"1") == 1
        finally:
            os.close(self._go)
        if not told:
            self.proc.kill()
            self.proc.wait()
            os.close(self._status)
            raise OcclumfsError(problem.decode(errors="replace") or "bubblewrap did not start")
        return SandboxProcess(self.proc, self._status)

    def cancel(self) -> None:
        """End it without running anything (when :meth:`start` was not called)."""
        for fd in (self._ready, self._go, self._status):
            os.close(fd)
        # Not by end of file alone: a process forked since (the rootfs server)
        # may hold the write end of its pipe too.
        self.proc.kill()
        self.proc.wait()


class _Child:
    """A forked child, as much of :class:`subprocess.Popen` as SandboxProcess uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _pid, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class SandboxProcess:
    """A program running in a sandbox: its bubblewrap monitor and the sandbox's init."""

    def __init__(self, proc: subprocess.Popen, status_fd: int) -> None:
        self.proc = proc
        self._status = os.fdopen(status_fd, "rb")
        self.init_pid: int | None = None
        self.problem: str | None = None  # why bubblewrap did not start, if it did not
        line = self._status.readline()  # {"child-pid": N}, written once the sandbox exists
        with contextlib.suppress(ValueError, TypeError, KeyError):
            data = json.loads(line)
            self.problem = data.get("error")
            self.init_pid = int(data["child-pid"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """Every process in the sandbox (the init and its descendants), outermost first."""
        if self.init_pid is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [self.init_pid]
        while todo:
            pid = todo.pop(0)
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def signal(self, signum: int, *, joined: bool = False) -> None:
        """Deliver ``signum`` to the programs (the init, pid 1 inside, ignores it).

        ``joined``: this process was spawned into another's pid namespace, so
        it has no init of its own; its first process is the program.
        """
        for pid in self.pids()[0 if joined else 1 :]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def kill(self) -> None:
        """SIGKILL the sandbox's init: the kernel then kills everything in the sandbox."""
        if self.init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)

    def wait(self) -> int:
        """The program's status as a shell reports it: its code, or 128 + signal."""
        code = self.proc.wait()
        exit_code = None
        with contextlib.suppress(ValueError, TypeError, OSError):
            for line in self._status:
                data = json.loads(line)
                if "exit-code" in data:
                    exit_code = int(data["exit-code"])
        self._status.close()
        if exit_code is not None:
            return exit_code
        if code < 0:
            return 128 - code
        if code != 0 and self.init_pid is None:
            raise OcclumfsError(
                self.problem or "the sandbox could not be set up (see bwrap's message above)"
            )
        return code
