"""Fixtures for the ``occlum`` tests (imported by each test module: a conftest.py here
would shadow the top-level one). Real command, binaries, bwrap and FUSE."""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from occlumfs.mount import mounted_paths

__all__ = [
    "_machine_state",
    "built",
    "fuse_server_of",
    "hello_world",
    "occlum",
    "pty_expect",
    "pty_read",
    "run_occlum",
]


@pytest.fixture(autouse=True)
def _machine_state(tmp_path_factory, monkeypatch):
    """Machine secret and image keys in a per-session directory, not /var/lib."""
    monkeypatch.setenv("OCCLUM_STATE_DIR", str(tmp_path_factory.getbasetemp() / "occlum-state"))


def run_occlum(
    *args: str | os.PathLike,
    cwd: Path | None = None,
    check: bool = True,
    input: bytes | None = None,
    env: dict | None = None,
    module: str = "libos",
    timeout: float = 180,
) -> subprocess.CompletedProcess:
    """Run ``occlum ARGS`` (or another libos entry point) as a user would."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    done = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        input=input,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    out = subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode()
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr}")
    return out


@pytest.fixture
def occlum():
    """``occlum(*args, cwd=..., check=..., input=..., env=..., module=...)``."""
    return run_occlum


def fuse_server_of(run_pid: int) -> int:
    """The FUSE server of ``occlum run`` ``run_pid``: its one child that is not bubblewrap."""
    children = Path(f"/proc/{run_pid}/task/{run_pid}/children").read_text().split()
    server = [int(c) for c in children if b"bwrap" not in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(server) == 1, children
    return server[0]


def assert_no_leftover_mounts(instance: Path) -> None:
    """Nothing is mounted for ``instance`` (its rootfs lives under a hash of its path)."""
    tag = hashlib.sha256(os.fsencode(os.path.realpath(instance))).hexdigest()[:16]
    leftover = [p for p in mounted_paths() if tag in p.parts or str(instance) in str(p)]
    assert not leftover, leftover


@pytest.fixture(scope="session")
def hello_world(tmp_path_factory) -> Path:
    """The seed's program, built with occlum-gcc (musl)."""
    d = tmp_path_factory.mktemp("hello")
    (d / "hello_world.c").write_text(
        '#include <stdio.h>\nint main(void) { printf("Hello World!\\n"); return 0; }\n'
    )
    run_occlum("gcc", d / "hello_world.c", "-o", d / "hello_world", module="libos.toolchain")
    return d / "hello_world"


@pytest.fixture
def built(tmp_path, hello_world, occlum) -> Path:
    """A new instance with hello_world and busybox in image/bin, built."""
    occlum("new", "inst", cwd=tmp_path)
    inst = tmp_path / "inst"
    (inst / "image/bin/hello_world").write_bytes(hello_world.read_bytes())
    (inst / "image/bin/hello_world").chmod(0o755)
    (inst / "image/bin/busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (inst / "image/bin/busybox").chmod(0o755)
    occlum("build", cwd=inst)
    return inst


CURSOR_QUERY = b"\x1b[6n"  # busybox's line editor asks where the cursor is


def pty_read(fd: int, seen: bytearray, timeout: float) -> bool:
    """Read what the terminal shows (answering cursor queries as a terminal does)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return False
    try:
        chunk = os.read(fd, 4096)
    except OSError:
        chunk = b""
    assert chunk, f"terminal closed; got {bytes(seen)[-300:]!r}"
    for _ in range(chunk.count(CURSOR_QUERY)):
        os.write(fd, b"\x1b[1;1R")
    seen += chunk.replace(CURSOR_QUERY, b"")
    return True


def pty_expect(fd: int, want: bytes, seen: bytearray, timeout: float = 60.0) -> None:
    shown = pty_shows(fd, want, seen, timeout)
    assert shown, f"timed out waiting for {want!r}; got {bytes(seen)!r}"


def pty_shows(fd: int, want: bytes, seen: bytearray, timeout: float) -> bool:
    """Whether ``want`` appears before ``timeout`` seconds of silence; ``seen`` loses
    everything up to its end when it does."""
    while want not in seen:
        if not pty_read(fd, seen, timeout):
            return False
    del seen[: seen.index(want) + len(want)]
    return True
