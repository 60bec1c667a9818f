"""The local trusted state moved forward after each commit, by a thread of its own.

:class:`StateWriter` is what :class:`occlumfs.sefs.fs.SefsFS` submits each
commit's (and each logged fsync's) position to; the writes themselves are
:class:`occlumfs.sefs.state.TrustedState`'s.
"""

from __future__ import annotations

import os
import threading
import weakref

from occlumfs.sefs.state import TrustedState

LOG_STATE_INTERVAL = 1.0  # seconds between two trusted-state writes of a log position


class StateWriter:
    """Moves the local trusted state forward after each commit, off the request path.

    The state may lag the head (a crash between a commit and its state write is
    accepted by design, docs/formats/sefs.md), so an fsync need not wait for its
    two host fsyncs: a thread writes the newest submitted commit, skipping any
    that a later one overtook. A failed write is raised by the next ``submit``
    or by ``drain``, which ``close`` calls to write the last commit's state.

    A log position (an fsync that appended to the log, version 3) is written at
    most once per LOG_STATE_INTERVAL, so the state's fsyncs do not double the
    host's; a commit's state, and ``drain``, end that wait.
    """

    def __init__(self, state: TrustedState | None) -> None:
        self._state = state
        self._cond = threading.Condition()
        self._pending: tuple[int, bytes, int, bytes] | None = None
        self._busy = False
        self._urgent = False  # a commit's state or a drain waits: no pacing
        self._pacing = False  # the thread waits out the interval after a log position
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        _STATE_WRITERS.add(self)

    def _before_fork(self) -> None:
        """Settle before a fork: no state half-written, the lock held across it."""
        self._cond.acquire()
        if self._thread is not None and self._pid == os.getpid():
            self._cond.wait_for(lambda: not self._busy)
        if self._pending is not None:  # written here, once, not by two processes
            pending, self._pending = self._pending, None
            self._write(pending)

    def _after_fork(self, child: bool) -> None:
        if child:  # the lock was copied held and the thread did not come along
            self._cond = threading.Condition()
            self._thread = None
            self._busy = self._pacing = False
        else:
            self._cond.release()

    def submit(self, counter: int, root_tag: bytes, log_seq: int = 0, log_tag: bytes = b"") -> None:
        with self._cond:
            self._raise()
            self._pending = (counter, root_tag, log_seq, log_tag)
            self._urgent = self._urgent or not log_seq
            # Threads do not survive the mount's fork: start one in whoever commits.
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._busy = self._pacing = False
                self._thread = threading.Thread(target=self._run, name="sefs-state", daemon=True)
                self._thread.start()
            # A thread pacing log positions takes this one when its wait ends: waking
            # it for each fsync would only hand it the GIL to go back to sleep.
            if self._urgent or not self._pacing:
                self._cond.notify()

    def drain(self) -> None:
        """Wait until every submitted state is written; raise the failure if one failed."""
        with self._cond:
            if self._thread is not None and self._pid == os.getpid():
                self._urgent = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._pending is None and not self._busy)
            elif self._pending is not None:  # no thread of ours: write it here
                pending, self._pending = self._pending, None
                self._write(pending)
            self._raise()

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write(self, pending: tuple[int, bytes, int, bytes]) -> None:
        try:
            if self._state is not None:
                self._state.update(*pending)
        except BaseException as exc:  # handed to the request thread, which reports it
            self._error = exc

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None)
                pending, self._pending = self._pending, None
                self._busy = True
                self._urgent = False
            self._write(pending)  # type: ignore[arg-type]
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                if pending[2]:  # a log position: pace the next one
                    self._pacing = True
                    self._cond.wait_for(lambda: self._urgent, timeout=LOG_STATE_INTERVAL)
                    self._pacing = False


_STATE_WRITERS: weakref.WeakSet[StateWriter] = weakref.WeakSet()


def _each_writer(method: str, *args: bool) -> None:
    for writer in list(_STATE_WRITERS):
        getattr(writer, method)(*args)


# The mount forks into the background after a commit may have started the
# state thread: a lock that thread held at the fork would stay held in the
# server for ever (the server hung in drain at unmount).
os.register_at_fork(
    before=lambda: _each_writer("_before_fork"),
    after_in_parent=lambda: _each_writer("_after_fork", False),
    after_in_child=lambda: _each_writer("_after_fork", True),
)
