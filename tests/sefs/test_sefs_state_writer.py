"""The trusted-state writer's pacing of log positions.

An fsync that appends to the log moves the trusted state forward to its log
position, but the state thread writes a position at most once an interval:
the positions submitted meanwhile wait, and only the newest is written when
the interval ends. A commit's state, or a drain, ends the wait at once.
"""

from __future__ import annotations

import threading

import pytest

from occlumfs.sefs import statewriter
from occlumfs.sefs.state import TrustedState
from occlumfs.sefs.statewriter import StateWriter

FS_ID = bytes(16)
MAC_KEY = bytes(range(32))
WAIT = 60  # seconds: a hang, not a pace, fails the test


class RecordingState(TrustedState):
    """A real state file that remembers each update and signals it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.written: list[tuple[int, int]] = []
        self.changed = threading.Condition()

    def update(self, counter: int, root_tag: bytes, log_seq: int = 0, log_tag: bytes = b"") -> None:
        super().update(counter, root_tag, log_seq, log_tag)
        with self.changed:
            self.written.append((counter, log_seq))
            self.changed.notify_all()

    def wait_for(self, count: int) -> list[tuple[int, int]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.written) >= count, WAIT)
            return list(self.written)


@pytest.fixture
def paced(monkeypatch):
    # An interval no test outlasts: whatever is written before it ends was asked for.
    monkeypatch.setattr(statewriter, "LOG_STATE_INTERVAL", 3600.0)


def _tag(n: int) -> bytes:
    return bytes([n % 256]) * 16


def test_positions_wait_for_the_interval_and_a_commit_ends_the_wait(tmp_path, paced) -> None:
    state = RecordingState(tmp_path, FS_ID, MAC_KEY)
    writer = StateWriter(state)
    writer.submit(5, _tag(5), 1, _tag(1))
    assert state.wait_for(1) == [(5, 1)]
    for seq in range(2, 200):  # fsyncs while the thread paces: held, not written
        writer.submit(5, _tag(5), seq, _tag(seq))
    assert state.written == [(5, 1)]
    writer.submit(6, _tag(6))  # a commit: written now, and it overtakes the positions
    assert state.wait_for(2) == [(5, 1), (6, 0)]
    assert state.position()[0] == 6
    writer.drain()
    assert state.written == [(5, 1), (6, 0)]


def test_a_drain_writes_the_newest_waiting_position(tmp_path, paced) -> None:
    state = RecordingState(tmp_path, FS_ID, MAC_KEY)
    writer = StateWriter(state)
    writer.submit(5, _tag(5), 1, _tag(1))
    state.wait_for(1)
    for seq in range(2, 50):
        writer.submit(5, _tag(5), seq, _tag(seq))
    writer.drain()
    assert state.written == [(5, 1), (5, 49)]
    counter, _, seq, tag = state.position()
    assert (counter, seq, tag) == (5, 49, _tag(49))
