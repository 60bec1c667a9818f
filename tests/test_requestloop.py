"""The request loop's busy polling: when it polls, when it stops, and that it changes no answer."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from occlumfs.errors import ExitCode, UsageError
from occlumfs.mount import mount_record, mounted_paths, wait_for_exit
from occlumfs.requestloop import (
    BACKOFF_WAITS,
    BUSY_POLL_DEFAULT_US,
    BUSY_POLL_ENV,
    RequestLoop,
    busy_poll_ns,
)

# -- the setting ----------------------------------------------------------------------


def test_the_default_window_applies_when_the_setting_is_absent_or_blank():
    assert busy_poll_ns({}, cpus=2) == BUSY_POLL_DEFAULT_US * 1000
    assert busy_poll_ns({BUSY_POLL_ENV: "  "}, cpus=2) == BUSY_POLL_DEFAULT_US * 1000


def test_the_setting_gives_the_window_and_zero_turns_polling_off():
    assert busy_poll_ns({BUSY_POLL_ENV: "250"}, cpus=4) == 250_000
    assert busy_poll_ns({BUSY_POLL_ENV: "0"}, cpus=4) == 0


def test_one_cpu_never_polls():
    assert busy_poll_ns({}, cpus=1) == 0
    assert busy_poll_ns({BUSY_POLL_ENV: "500"}, cpus=1) == 0


@pytest.mark.parametrize("text", ["fast", "-1", "1.5", "10001"])
def test_a_malformed_setting_is_a_usage_error(text):
    with pytest.raises(UsageError, match=BUSY_POLL_ENV):
        busy_poll_ns({BUSY_POLL_ENV: text}, cpus=2)


@pytest.mark.fuse
def test_mount_refuses_a_malformed_setting_before_mounting(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run_cli("mount", "-t", "mem", "x", mnt, env={BUSY_POLL_ENV: "soon"}, check=False)
    assert done.returncode == ExitCode.USAGE
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and BUSY_POLL_ENV in lines[0] and "Traceback" not in done.stderr
    assert Path(os.path.abspath(mnt)) not in mounted_paths()


# -- the loop's polling -----------------------------------------------------------------


@contextlib.contextmanager
def _pipe_loop(window_ns: int):
    """A loop polling one pipe as it would poll /dev/fuse; yields it and the write end."""
    loop = RequestLoop(busy_poll=window_ns)
    r, w = os.pipe()
    loop._poll.register(r, select.POLLIN)
    try:
        yield loop, w
    finally:
        loop.close()
        os.close(r)
        os.close(w)


@pytest.fixture
def pipe_loop():
    """With a 10 ms window."""
    with _pipe_loop(10_000_000) as made:
        yield made


def test_polling_returns_what_is_ready_at_once(pipe_loop):
    loop, w = pipe_loop
    os.write(w, b"x")
    ready = loop._busy_poll_once(0)
    assert len(ready) == 1 and loop._backoff == 0


def test_polling_gives_up_after_its_window_with_nothing_ready(pipe_loop):
    loop, _ = pipe_loop
    started = time.perf_counter_ns()
    assert loop._busy_poll_once(started) == []
    # It polled the whole window, unless it lost its CPU on the way (a busy machine).
    assert time.perf_counter_ns() - started >= 10_000_000 or loop._backoff == BACKOFF_WAITS


def test_losing_the_cpu_while_polling_stops_polling_for_a_while():
    """Pinned to one CPU beside a busy process, the poller is preempted; a preemption
    lasts a scheduler slice, far longer than the window, and is still noticed."""
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    hog = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    try:
        os.sched_setaffinity(0, {cpu})
        with _pipe_loop(100_000) as (loop, _):
            for _ in range(5000):  # 100 us windows: 0.5 s at most; a slice is a few ms
                if loop._busy_poll_once(time.perf_counter_ns()) == [] and loop._backoff:
                    break
            assert loop._backoff == BACKOFF_WAITS
    finally:
        os.sched_setaffinity(0, saved)
        hog.kill()
        hog.wait()


# -- a mount that polls -------------------------------------------------------------------


@pytest.mark.fuse
def test_a_polling_server_answers_back_to_back_requests_and_stops_on_a_signal(tmp_path):
    """With the longest window it polls between all these requests; SIGTERM still ends it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "server.log"
    env = {BUSY_POLL_ENV: "10000"}
    run_cli("mount", "-t", "mem", "x", mnt, "--log-file", log, env=env)
    pid = int(mount_record(mnt)["pid"])
    try:
        for i in range(300):
            (mnt / f"f{i}").write_bytes(b"%d" % i)
        assert sorted(os.listdir(mnt)) == sorted(f"f{i}" for i in range(300))
        assert all((mnt / f"f{i}").read_bytes() == b"%d" % i for i in range(300))
        os.kill(pid, signal.SIGTERM)
        # The server unmounts on its way out.
        assert wait_for_exit(pid, 30), "server still running 30 s after SIGTERM"
    finally:
        if Path(os.path.abspath(mnt)) in mounted_paths():
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
    assert Path(os.path.abspath(mnt)) not in mounted_paths()
    text = log.read_text()
    assert "received SIGTERM" in text and "Traceback" not in text


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.fuse
def test_an_idle_server_sleeps_after_a_burst(mount, monkeypatch):
    """The polling ends with the burst: an idle server spends no CPU (here over 1 s)."""
    monkeypatch.setenv(BUSY_POLL_ENV, "10000")
    with mount("x", "-t", "mem") as mnt:
        pid = int(mount_record(mnt)["pid"])
        for i in range(500):
            with contextlib.suppress(FileNotFoundError):
                os.stat(mnt / f"absent{i}")
        before = _cpu_ticks(pid)
        time.sleep(1.0)  # an observation window, not a wait for anything
        spent = _cpu_ticks(pid) - before
        # A server still polling would spend the whole second (~100 ticks).
        assert spent <= 5, f"idle server spent {spent} ticks in 1 s"
