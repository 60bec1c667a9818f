"""``occlum run``: verify the build, mount ``/``, run one program in the sandbox.

Run reads only ``build/`` (manifest, signature, layers) and ``run/`` (the
writable store): never ``Occlum.json``. One run at a time per instance: the
lock file in ``run/`` is held for the whole run, and a second run refuses.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import signal
import sys
from pathlib import Path

from libos.build import VerifiedBuild, rootfs_layers, verify_build
from libos.config import Config
from libos.execcheck import check_executable
from libos.instance import Instance
from libos.protocol import FORWARDED
from libos.rebase import rebase_store
from libos.rootfs import mount_rootfs, rootfs_mountpoint, sefs_state_dir, unmount_rootfs
from libos.sandbox import Limits, Prepared, Sandbox, apply_limits, release_limits
from occlumfs.errors import InUseError, NotFoundError, UsageError


def check_entry_point(path: str, entry_points: list[str]) -> None:
    """Occlum's rule: an absolute path, no '..', under an entry point component-wise."""
    if not path.startswith("/"):
        raise UsageError(f"{path}: the program must be an absolute path inside the instance")
    parts = [p for p in path.split("/") if p]
    if ".." in parts or "." in parts:
        raise UsageError(f"{path}: '.' and '..' are not allowed in the program path")
    for entry in entry_points:
        prefix = [p for p in entry.split("/") if p]
        if parts[: len(prefix)] == prefix:
            return
    allowed = ", ".join(entry_points) or "(none)"
    raise UsageError(f"{path}: not under an entry point of this instance ({allowed})")


def program_env(config: Config, host: dict[str, str] | None = None) -> dict[str, str]:
    """env.default, then the host variables named in env.untrusted (they override)."""
    host = os.environ if host is None else host
    env: dict[str, str] = {}
    for item in config.env_default:
        name, _, value = item.partition("=")
        env[name] = value
    for name in config.env_untrusted:
        if name in host:
            env[name] = host[name]
    return env


def sandbox_for(build: VerifiedBuild, root: Path) -> Sandbox:
    """The sandbox the config describes, with ``root`` as ``/``."""
    config = build.config
    rootfs_layers(config)
    binds: list[tuple[Path, str]] = []
    proc = dev = False
    for mount in config.mounts():
        kind, target = mount["type"], mount["target"]
        if kind == "hostfs":
            source = Path(mount.get("source", "."))
            host = (build.instance.root / source).resolve()
            if not host.is_dir():
                raise NotFoundError(f"hostfs {target}: {host} is not a directory")
            binds.append((host, target))
        elif kind == "procfs":
            proc = True
        elif kind == "devfs":
            dev = True
    limits = Limits(
        memory=config.size("resource_limits", "user_space_size"),
        tasks=config.get("resource_limits", "max_num_of_threads"),
        stack=config.size("process", "default_stack_size"),
    )
    return Sandbox(root=root, binds=binds, proc=proc, dev=dev, tmpfs=["/tmp"], limits=limits)


def covered_paths(sandbox: Sandbox) -> tuple[str, ...]:
    """What the sandbox mounts over its root: what lies there is not the image's."""
    special = [p for p, on in (("/proc", sandbox.proc), ("/dev", sandbox.dev)) if on]
    return (*(target for _host, target in sandbox.binds), *sandbox.tmpfs, *special)


def lock_instance(instance: Instance, *, wait: bool = False, role: str = "occlum run") -> int:
    """Take ``run/occlum.lock`` (one run, or one started instance, at a time); its fd.

    The file says who holds it: ``PID ROLE`` (see ``write_holder``)."""
    instance.run.mkdir(exist_ok=True)
    fd = os.open(instance.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        holder, _role = read_holder(fd)
        os.close(fd)
        if (instance.run / "occlum.sock").exists():
            raise InUseError(
                f"{instance.root}: the instance is started (pid {holder}); "
                "use occlum exec, or occlum stop"
            ) from None
        raise InUseError(
            f"{instance.root}: the instance is in use (pid {holder}); its store is locked"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    write_holder(fd, role)
    return fd


# What a started instance's server writes in its lock once it begins to stop.
STOPPING = "stopping"


def write_holder(fd: int, role: str) -> None:
    """Say in the lock file who holds it: this process's pid and its role
    (``occlum run``, ``occlum mount``, ``occlum start``, ``stopping``...). Roles are
    padded to one width so that a change of role is one in-place write."""
    os.pwrite(fd, f"{os.getpid()} {role:<15}\n".encode(), 0)


def read_holder(fd: int) -> tuple[str, str]:
    """The lock file's pid (``?`` when unknown) and role (empty when unknown)."""
    words = os.pread(fd, 64, 0).decode(errors="replace").split(maxsplit=1)
    return (words[0] if words else "?"), (words[1].strip() if len(words) > 1 else "")


@contextlib.contextmanager
def instance_lock(instance: Instance):
    """Hold ``run/occlum.lock`` for the ``with`` block."""
    fd = lock_instance(instance)
    try:
        yield
    finally:
        os.close(fd)


def rebase_and_say(build: VerifiedBuild) -> None:
    """Move the store onto a rebuilt image (libos/rebase.py), and say so."""
    moved = rebase_store(build, sefs_state_dir())
    if moved is not None:
        print(
            "occlum: moved the writable layer onto this build "
            f"({moved['data_copied']} file(s) copied in from the previous image)",
            file=sys.stderr,
            flush=True,
        )


def holder_of(instance: Instance) -> tuple[int, str] | None:
    """Who holds the instance lock (pid, -1 when unknown, and role), or None when nobody does."""
    try:
        fd = os.open(instance.lock, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, role = read_holder(fd)
            return (int(pid) if pid.isdigit() else -1), role
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def running_pid(instance: Instance) -> int | None:
    """The pid holding the instance lock, or None when nobody runs it."""
    holder = holder_of(instance)
    return None if holder is None else holder[0]


def run(instance: Instance, program: str, args: list[str], image_key: Path | None = None) -> int:
    """Run ``program`` in ``instance``; its exit status (128 + signal when killed)."""
    from libos.control import connect

    sock = connect(instance)  # a started instance refuses below; a dead one is cleaned up
    if sock is not None:
        sock.close()
    with instance_lock(instance):
        build = verify_build(instance, image_key)
        check_entry_point(program, build.config.entry_points)
        rebase_and_say(build)
        sandbox = sandbox_for(build, rootfs_mountpoint(build))
        apply_limits(sandbox.limits, f"occlum-{os.getpid()}")
        try:
            # Bubblewrap's process joins the limits while the root is mounted.
            prepared = sandbox.prepare([program, *args], program_env(build.config))
            started = False
            try:
                handle = mount_rootfs(build)
                try:
                    inside = handle.mountpoint / posixpath.relpath(program, "/")
                    if not os.path.lexists(inside):
                        raise NotFoundError(f"{program}: no such program in the instance")
                    check_executable(handle.mountpoint, program, covered_paths(sandbox))
                    print(f"occlum: {sandbox.limits.describe()}", file=sys.stderr, flush=True)
                    started = True
                    return _run_program(prepared)
                finally:
                    unmount_rootfs(handle)
            finally:
                if not started:
                    prepared.cancel()
        finally:
            release_limits(sandbox.limits)


def _run_program(prepared: Prepared) -> int:
    """Start the prepared sandbox and run it to its end, forwarding signals to it;
    its status."""
    proc = None

    def forward(signum, _frame):
        if proc is not None:
            proc.signal(signum)

    saved = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        proc = prepared.start()
        return proc.wait()
    finally:
        if proc is None:
            prepared.proc.kill()
            prepared.proc.wait()
        elif proc.proc.poll() is None:
            proc.kill()
            proc.proc.wait()
        for signum, handler in saved.items():
            signal.signal(signum, handler)
