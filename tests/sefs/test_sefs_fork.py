"""The trusted-state writer across the mount's fork into the background.

A mount may commit (and so start the state thread) before it forks; the
server then goes on in the child. A lock the thread held at that fork stayed
held in the child for ever, and the server hung at unmount in ``drain``. The
fork now settles the writer first: a pending state is written once, before the
fork, and the child gets its own lock and, on its next commit, its own thread.
"""

from __future__ import annotations

import os
import select
import threading

from occlumfs.sefs.state import TrustedState
from occlumfs.sefs.statewriter import StateWriter

FS_ID = bytes(16)
MAC_KEY = bytes(range(32))


class BlockingState(TrustedState):
    """A real state file whose first update waits until the test lets it go."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.entered = threading.Event()
        self.go = threading.Event()
        self.counters: list[int] = []

    def update(self, counter: int, root_tag: bytes, log_seq: int = 0, log_tag: bytes = b"") -> None:
        self.entered.set()
        self.go.wait()
        self.counters.append(counter)
        super().update(counter, root_tag, log_seq, log_tag)


def _in_child(body) -> int:
    """Run ``body`` in a forked child; its exit status (1 on an exception), 99 if it hangs."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        status = 1
        try:
            status = body()
        finally:
            os.write(w, bytes([status]))
            os._exit(status)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 60)  # a hang, not a pace: fails the test
        if not ready:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return 99
        os.read(r, 1)
    finally:
        os.close(r)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_fork_during_a_state_write_leaves_the_child_a_working_writer(tmp_path) -> None:
    state = BlockingState(tmp_path, FS_ID, MAC_KEY)
    writer = StateWriter(state)
    writer.submit(1, b"\x01" * 16)
    assert state.entered.wait(60)
    writer.submit(2, b"\x02" * 16)  # pending while the thread writes commit 1
    threading.Thread(target=state.go.set).start()

    def child() -> int:
        writer.submit(3, b"\x03" * 16)
        writer.drain()
        return 0 if state.position()[0] == 3 and state.counters[-1] == 3 else 2

    assert _in_child(child) == 0
    writer.drain()
    # Both commits were written in the parent, each once: the child had nothing left of them.
    assert state.counters == [1, 2]
    assert state.position()[0] == 3  # the child's newer state stands


def test_the_childs_writer_works_when_the_fork_finds_it_idle(tmp_path) -> None:
    state = BlockingState(tmp_path, FS_ID, MAC_KEY)
    state.go.set()
    writer = StateWriter(state)
    writer.submit(1, b"\x01" * 16)
    writer.drain()

    def child() -> int:
        for counter in range(2, 5):
            writer.submit(counter, bytes([counter]) * 16)
        writer.drain()
        return 0 if state.position()[0] == 4 else 2

    assert _in_child(child) == 0
    assert state.counters == [1]
