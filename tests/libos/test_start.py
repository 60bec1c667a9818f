"""occlum start / exec / status / stop / kill: one sandbox, many programs, real bwrap and FUSE."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)
from libos_fixtures import assert_no_leftover_mounts, run_occlum

pytestmark = pytest.mark.fuse  # a started instance serves its rootfs over FUSE

SH = "/bin/busybox"


def exec_popen(inst: Path, *argv: str, env: dict | None = None) -> subprocess.Popen:
    """``occlum exec ARGV`` in the background, with pipes for its stdio."""
    return subprocess.Popen(
        [sys.executable, "-m", "libos", "exec", *argv],
        cwd=inst,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def finish(proc: subprocess.Popen) -> int:
    """Wait for a background ``occlum exec`` and close its pipes; its status."""
    proc.communicate(timeout=30)
    return proc.returncode


def server_pid(inst: Path) -> int:
    return int((inst / "run/occlum.lock").read_text().split()[0])


def wait_for_exit(pid: int, timeout: float = 30) -> None:
    """Wait for a process that is not our child (pidfd, no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([fd], [], [], timeout)[0], f"pid {pid} still running"
    finally:
        os.close(fd)


def test_start_exec_status_stop(built, occlum):
    started = occlum("start", cwd=built)
    assert "started (pid" in started.stderr
    try:
        again = occlum("start", cwd=built, check=False)
        assert again.returncode == 16 and again.stderr.count("\n") == 1, again.stderr
        assert "is started" in again.stderr
        run = occlum("run", SH, "true", cwd=built, check=False)
        assert run.returncode == 16 and "occlum exec, or occlum stop" in run.stderr
        assert "running (pid" in occlum("status", cwd=built).stdout

        # Several execs at once, each with its own stdin/stdout and status.
        script = 'echo ready; read x; echo "$1 got $x"; exit $1'
        procs = [exec_popen(built, SH, "sh", "-c", script, "sh", str(n)) for n in (3, 0, 7)]
        for p in procs:
            assert p.stdout.readline() == b"ready\n"
        assert "3 programs running" in occlum("status", cwd=built).stdout
        for n, p in zip((3, 0, 7), procs, strict=True):
            out, err = p.communicate(f"hello{n}\n".encode(), timeout=30)
            assert out == f"{n} got hello{n}\n".encode(), err
            assert p.returncode == n
        assert "0 programs running" in occlum("status", cwd=built).stdout

        # One pid namespace: a program sees another exec's program.
        sleeper = exec_popen(built, SH, "sh", "-c", "echo ready; exec sleep 100")
        assert sleeper.stdout.readline() == b"ready\n"
        ps = occlum("exec", SH, "ps", "-o", "args", cwd=built).stdout
        assert "sleep 100" in ps
        # Ctrl-C / SIGINT to occlum exec reaches its program.
        sleeper.send_signal(signal.SIGINT)
        assert finish(sleeper) == 128 + signal.SIGINT

        # The environment: env.default, plus only the host's env.untrusted names.
        env = occlum("exec", "--", SH, "env", cwd=built, env={"EXAMPLE": "x", "SECRET": "y"})
        assert "EXAMPLE=x" in env.stdout and "OCCLUM=yes" in env.stdout
        assert "SECRET" not in env.stdout

        # A client that hands over no fds, or goes away mid-request, is refused or
        # forgotten; the instance serves on.
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(built / "run/occlum.sock"))
            raw.sendall(b'{"op": "exec", "argv": ["/bin/busybox", "true"]}\n')
            assert b"must be handed over" in raw.recv(4096)
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(built / "run/occlum.sock"))
            raw.sendall(b'{"op": "ex')
        assert occlum("exec", SH, "true", cwd=built).returncode == 0

        # entry_points and a missing program: one line each.
        outside = occlum("exec", "/usr/bin/env", cwd=built, check=False)
        assert outside.returncode == 2 and "entry point" in outside.stderr
        missing = occlum("exec", "/bin/nope", cwd=built, check=False)
        assert missing.returncode == 14 and outside.stderr.count("\n") == 1
    finally:
        occlum("stop", cwd=built)
    assert "running" not in occlum("status", cwd=built).stdout
    assert not (built / "run/occlum.sock").exists()
    assert_no_leftover_mounts(built)
    not_started = occlum("exec", SH, "true", cwd=built, check=False)
    assert not_started.returncode == 14 and "not started" in not_started.stderr


def test_exec_cwd_and_env_options(built, occlum):
    """Docker's exec habits: -w/--cwd resolved inside the instance, -e for env.untrusted."""
    occlum("start", cwd=built)
    try:
        assert occlum("exec", "-w", "/bin", SH, "pwd", cwd=built).stdout == "/bin\n"
        assert occlum("exec", "--cwd=/", SH, "pwd", cwd=built).stdout == "/\n"
        # A link in the instance is followed inside it, never out to the host's tree.
        occlum("exec", SH, "sh", "-c", "mkdir -p /data && ln -s ../bin /data/up", cwd=built)
        occlum("exec", SH, "ln", "-s", "/usr/share", "/data/out", cwd=built)
        assert occlum("exec", "-w", "/data/up", SH, "pwd", cwd=built).stdout == "/bin\n"
        assert Path("/usr/share").is_dir()
        assert occlum("exec", SH, "test", "-d", "/usr/share", cwd=built, check=False).returncode
        out = occlum("exec", "-w", "/data/out", SH, "pwd", cwd=built, check=False)
        assert out.returncode == 14 and out.stderr.count("\n") == 1, out.stderr
        assert "no such directory in the instance" in out.stderr
        relative = occlum("exec", "-w", "bin", SH, "pwd", cwd=built, check=False)
        assert relative.returncode == 2 and "absolute" in relative.stderr

        # -e sets a variable only if Occlum.json lets the host set it.
        env = occlum("exec", "-e", "EXAMPLE=from-flag", "--", SH, "env", cwd=built).stdout
        assert "EXAMPLE=from-flag" in env.splitlines()
        passed = occlum("exec", "-e", "EXAMPLE", SH, "env", cwd=built, env={"EXAMPLE": "mine"})
        assert "EXAMPLE=mine" in passed.stdout.splitlines()
        refused = occlum("exec", "-e", "SECRET=x", SH, "env", cwd=built, check=False)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert "env.untrusted" in refused.stderr and "SECRET=x" not in refused.stdout
        unknown = occlum("exec", "-x", SH, "true", cwd=built, check=False)
        assert unknown.returncode == 2 and "unknown option -x" in unknown.stderr
        # The installed 'occlum' command (click) takes the same options.
        via_click = occlum("exec", "-w", "/bin", SH, "pwd", cwd=built, module="libos.cli")
        assert via_click.stdout == "/bin\n"
    finally:
        occlum("stop", cwd=built)


def test_stop_ends_running_execs_and_commits_what_they_wrote(built, occlum):
    occlum("start", cwd=built)
    polite = exec_popen(built, SH, "sh", "-c", "echo kept > /root/kept; echo ready; exec sleep 100")
    stubborn = exec_popen(
        built, SH, "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"
    )
    assert polite.stdout.readline() == b"ready\n"
    assert stubborn.stdout.readline() == b"ready\n"
    occlum("stop", "-t", "0.5", cwd=built)
    assert finish(polite) == 128 + signal.SIGTERM
    assert finish(stubborn) == 128 + signal.SIGKILL  # ignored SIGTERM: killed
    assert_no_leftover_mounts(built)
    assert occlum("run", SH, "cat", "/root/kept", cwd=built).stdout == "kept\n"


def test_kill_then_restart(built, occlum):
    occlum("start", cwd=built)
    p = exec_popen(built, SH, "sh", "-c", "echo data > /root/f; echo ready; exec sleep 100")
    assert p.stdout.readline() == b"ready\n"
    killed = occlum("kill", cwd=built)
    assert "committed" in killed.stderr
    assert finish(p) == 128 + signal.SIGKILL
    occlum("start", cwd=built)  # restart
    try:
        assert occlum("exec", SH, "cat", "/root/f", cwd=built).stdout == "data\n"
    finally:
        occlum("stop", cwd=built)


def test_a_server_killed_with_sigkill_is_noticed_and_recovered(built, occlum):
    occlum("start", cwd=built)
    occlum("exec", SH, "sh", "-c", "echo survived > /root/s", cwd=built)
    pid = server_pid(built)
    os.kill(pid, signal.SIGKILL)
    wait_for_exit(pid)
    status = occlum("status", cwd=built)
    assert "running" not in status.stdout
    assert f"server (pid {pid}) died" in status.stderr
    assert not (built / "run/occlum.sock").exists()
    # Its FUSE server committed on its way out; the next start sees the data.
    occlum("start", cwd=built)
    try:
        assert occlum("exec", SH, "cat", "/root/s", cwd=built).stdout == "survived\n"
    finally:
        occlum("stop", cwd=built)
    assert_no_leftover_mounts(built)


def test_exec_programs_are_held_to_the_sandbox_limits(built, occlum):
    """The spawner that starts exec's programs joined the sandbox's cgroups (or took
    its rlimits) once; every program it starts is held to them."""
    config = json.loads((built / "Occlum.json").read_text())
    config["resource_limits"].update(user_space_size="24MB", max_num_of_threads=8)
    (built / "Occlum.json").write_text(json.dumps(config))
    occlum("build", cwd=built)
    started = occlum("start", cwd=built)
    try:
        forks = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do busybox sleep 2 & done; wait; echo done"
        many = occlum("exec", SH, "sh", "-c", forks, cwd=built, check=False)
        big = occlum("exec", SH, "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1",
                     cwd=built, check=False)  # fmt: skip
    finally:
        occlum("stop", cwd=built)
    assert "memory 24MB, 8 tasks" in started.stderr
    assert big.returncode != 0  # 64 MiB in one buffer does not fit in 24 MiB
    if "cgroup" in started.stderr:
        assert "can't fork" in many.stderr or "Resource temporarily" in many.stderr, many.stderr
    rlimits = {"OCCLUM_LIMITS": "rlimits"}
    occlum("start", cwd=built, env=rlimits)
    try:
        limits = occlum("exec", SH, "sh", "-c", "ulimit -v; ulimit -s", cwd=built)
    finally:
        occlum("stop", cwd=built)
    assert limits.stdout.split() == [str(24 * 1024), str(4 * 1024)]  # KiB: AS, stack


def test_orphans_of_exec_programs_are_reaped(built, occlum):
    """A program's orphans become children of the held sandbox's init, which has
    them reaped as they exit: no zombies piling up against the task limit."""
    config = json.loads((built / "Occlum.json").read_text())
    config["resource_limits"]["max_num_of_threads"] = 8
    (built / "Occlum.json").write_text(json.dumps(config))
    occlum("build", cwd=built)
    occlum("start", cwd=built)
    try:
        # echo is orphaned when its subshell exits; cat sees EOF once echo has exited.
        orphan = "{ (busybox echo x &) ; } | busybox cat"
        for _ in range(12):  # more than the 8 tasks
            assert occlum("exec", SH, "sh", "-c", orphan, cwd=built).stdout == "x\n"
        ps = occlum("exec", SH, "ps", "-o", "stat,comm", cwd=built).stdout.splitlines()
    finally:
        occlum("stop", cwd=built)
    assert [line.split()[0][0] for line in ps[1:]] == ["S", "R"], ps  # the init, ps


def spawner_pid(inst: Path) -> int:
    """The instance's spawner: the server's child running libos/spawner.py."""
    tasks = Path(f"/proc/{server_pid(inst)}/task").glob("*/children")  # any thread's
    children = [c for task in tasks for c in task.read_text().split()]
    found = [int(c) for c in children if b"spawner.py" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(found) == 1, children
    return found[0]


def test_a_dead_spawner_is_replaced_by_the_next_exec(built, occlum):
    occlum("start", cwd=built)
    try:
        waiting = exec_popen(built, SH, "sh", "-c", "echo ready; read line; echo got $line")
        assert waiting.stdout.readline() == b"ready\n"  # started by the spawner
        dead = spawner_pid(built)
        os.kill(dead, signal.SIGKILL)
        wait_for_exit(dead)
        # The exec that waited on it cannot learn its program's status: one line, exit 1.
        waiting.stdin.write(b"late\n")
        out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 1, (out, err)
        assert err == b"occlum: error: the instance's spawner died; the program's status is lost\n"
        # The next exec starts another spawner, in the same sandbox.
        again = occlum("exec", SH, "sh", "-c", "echo fine; exit 5", cwd=built, check=False)
        assert (again.returncode, again.stdout) == (5, "fine\n")
        assert spawner_pid(built) != dead
        log = (built / "run/occlum.log").read_text()
        assert f"the spawner (pid {dead}) died (-9); starting another" in log
    finally:
        occlum("stop", cwd=built)
    assert_no_leftover_mounts(built)


def test_start_refuses_a_broken_build_in_one_line(built, occlum):
    layer = built / "build/mount/__ROOT/image.layer"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 1
    layer.write_bytes(bytes(data))
    bad = run_occlum("start", cwd=built, check=False)
    assert bad.returncode == 13 and bad.stderr.count("\n") == 1, bad.stderr
    assert not (built / "run/occlum.sock").exists()


def test_stop_and_kill_name_the_occlum_run_that_holds_the_instance(built):
    run = subprocess.Popen(
        [sys.executable, "-m", "libos", "run", SH, "sh", "-c", "echo ready; read x"],
        cwd=built,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert run.stdout.readline() == b"ready\n"
        for verb in ("stop", "kill"):
            held = run_occlum(verb, cwd=built, check=False)
            assert held.returncode == 16 and held.stderr.count("\n") == 1, held.stderr
            assert f"not started; occlum run holds it (pid {run.pid})" in held.stderr
    finally:
        run.communicate(b"\n", timeout=60)
    assert run.returncode == 0  # untouched by the refused stop and kill


def blocked_on_lock(inst: Path) -> bool:
    """Somebody waits for the instance lock (a blocked flock in /proc/locks)."""
    ino = os.stat(inst / "run/occlum.lock").st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return any("->" in line and line.split()[6].endswith(f":{ino}") for line in lines)


def test_a_kill_that_finds_the_instance_stopping_waits_and_succeeds(built, occlum):
    occlum("start", cwd=built)
    stubborn = exec_popen(
        built, SH, "sh", "-c", "trap 'echo term' TERM; echo ready; while :; do sleep 1; done"
    )
    assert stubborn.stdout.readline() == b"ready\n"
    stop = subprocess.Popen([sys.executable, "-m", "libos", "stop", "-t", "60"], cwd=built)
    kill = None
    try:
        assert stubborn.stdout.readline() == b"term\n"  # the server is stopping
        kill = subprocess.Popen(
            [sys.executable, "-m", "libos", "kill"], cwd=built, stderr=subprocess.PIPE
        )
        # The kill finds no socket and waits for the stopping server's lock.
        while not blocked_on_lock(built):
            assert kill.poll() is None, kill.stderr.read()
            select.select([], [], [], 0.02)
        stubborn.kill()  # a vanished exec client ends its program: the stop goes on
        assert stop.wait(timeout=60) == 0
        _, said = kill.communicate(timeout=60)
        assert kill.returncode == 0 and b"killed; the writable layer is committed" in said, said
    finally:
        for proc in (stop, kill, stubborn):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()
    assert_no_leftover_mounts(built)
