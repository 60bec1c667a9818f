"""The server's request loop: what pyfuse3 needs of trio, for handlers that never wait.

:func:`occlumfs.mount.serve` runs it in place of trio's scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time

from occlumfs.errors import UsageError
from occlumfs.fuselib import pyfuse3

log = logging.getLogger("occlumfs.mount")

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

BUSY_POLL_ENV = "OCCLUMFS_BUSY_POLL_US"
BUSY_POLL_DEFAULT_US = 100
BUSY_POLL_MAX_US = 10_000
# A gap this long between two polls (each a few hundred ns) means the server
# was taken off its CPU while polling, for longer than an interrupt takes:
# other work wants the CPUs, so it stops polling for a while.
PREEMPTED_NS = 50_000
BACKOFF_WAITS = 1000


def busy_poll_ns(environ: dict[str, str] | None = None, cpus: int | None = None) -> int:
    """How long the server polls for the next request before it sleeps, in ns.

    ``$OCCLUMFS_BUSY_POLL_US`` (0 turns it off) or the default; always 0 when
    the server may run on one CPU only, where polling would only take the CPU
    from the program about to send that request.
    """
    text = (os.environ if environ is None else environ).get(BUSY_POLL_ENV, "")
    if not text.strip():
        micros = BUSY_POLL_DEFAULT_US
    else:
        try:
            micros = int(text)
        except ValueError:
            micros = -1
        if not 0 <= micros <= BUSY_POLL_MAX_US:
            raise UsageError(
                f"${BUSY_POLL_ENV}={text!r}: not a whole number of microseconds "
                f"from 0 to {BUSY_POLL_MAX_US}"
            )
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    return micros * 1000 if cpus > 1 else 0


class RequestLoop:
    """What pyfuse3 needs of trio, for handlers that never wait: a request loop.

    Why: through trio, each request cost ~75 µs of server CPU on top of the
    handler (a lock hand-off between two worker tasks, an epoll
    re-registration, two passes of the scheduler), about three times what
    libfuse and our handlers take together. The adapter's handlers never
    await (the filesystem objects are synchronous), so there is nothing to
    schedule: this loop waits for /dev/fuse with one ``poll`` and runs each
    request to completion before reading the next, as a single-threaded C
    server does. pyfuse3 finds its event loop in the module attribute
    ``pyfuse3.trio`` (the way ``pyfuse3.asyncio`` swaps in asyncio) and uses
    only the names defined here; pyfuse3 3.5 is the first to take all of them
    from there (3.4 creates a real ``trio.Lock`` at init, before the swap).

    After answering a request the loop does not go to sleep at once: for up
    to ``busy_poll`` ns it polls /dev/fuse without blocking, and only then
    waits in ``poll``. A program making requests back to back (a stat, a
    create, a small read) sends the next within tens of µs; caught while
    polling, it costs neither the server's sleep and wake-up nor the
    client's wake-up of the server, which on this kind of machine (two vCPUs)
    are half of a request's round trip. It polls only when the previous
    request also came within the window, so a server that is asked now and
    then, or is idle, sleeps as before; it never spends more than one window
    of CPU at the end of a burst. When the machine is busy (the server loses
    its CPU while polling), it stops polling for the next ``BACKOFF_WAITS``
    requests: there, polling takes CPU time from the program it serves.
    See docs/performance.md, "Busy polling".

    SIGINT and SIGTERM reach the loop through ``signal.set_wakeup_fd``: the
    signal number is written to a pipe that ``poll`` watches beside
    /dev/fuse, so a signal is seen whenever it arrives, even between the last
    check and the wait (a flag set by a Python-level handler could be missed
    there until the next request).
    """

    class ClosedResourceError(Exception):
        """Raised by ``wait_readable`` to end pyfuse3's session loop."""

    class Lock:
        # One task reads requests: there is never anyone to exclude.
        async def __aenter__(self) -> None:
            return None

        async def __aexit__(self, *exc: object) -> None:
            return None

    class _Task:
        name = "fuse-requests"

    class _Nursery:
        """Runs each started task to completion, in order, at the end of the block."""

        async def __aenter__(self) -> RequestLoop._Nursery:
            self._tasks: list = []
            return self

        def start_soon(self, fn, *args, name=None) -> None:
            self._tasks.append(fn(*args))

        async def __aexit__(self, *exc: object) -> None:
            while self._tasks:
                RequestLoop.run(self._tasks.pop(0))

    def __init__(self, busy_poll: int = 0) -> None:
        self.lowlevel = self
        self._busy_poll = busy_poll
        # How long the last wait took (ns): poll only after a short one.
        self._last_wait = 0
        self._backoff = 0  # waits left without polling
        self.stop_signal: signal.Signals | None = None
        self._closing = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._wake_r, select.POLLIN)
        self._fuse_fd: int | None = None
        # A callable run once the first request (always FUSE_INIT) has been answered.
        self.after_init = None

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    @staticmethod
    def run(coro):
        """Run ``coro``, which must finish without suspending; its result."""
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        raise RuntimeError("a FUSE request handler suspended; the request loop cannot resume it")

    # -- the part of trio's API pyfuse3 calls -------------------------------------
    def current_trio_token(self) -> None:
        return None

    def current_task(self) -> RequestLoop._Task:
        return self._Task()

    def open_nursery(self) -> RequestLoop._Nursery:
        return self._Nursery()

    def notify_closing(self, fd: int) -> None:
        self._closing = True

    async def wait_readable(self, fd: int) -> None:
        if self._fuse_fd != fd:
            self._poll.register(fd, select.POLLIN)
            self._fuse_fd = fd
        elif self.after_init is not None:
            # pyfuse3 waits once per request: this second wait follows the
            # answer to FUSE_INIT, which reset what the mount may tune.
            hook, self.after_init = self.after_init, None
            hook()
        poll = self._poll.poll
        started = time.perf_counter_ns()
        ready = None
        if self._backoff:
            self._backoff -= 1
        elif self._last_wait < self._busy_poll:
            ready = self._busy_poll_once(started)
        while not self._closing:
            for got, _ in ready or poll():
                if got == self._wake_r:
                    self._take_signals()
                    ready = None
                    break
            else:
                self._last_wait = time.perf_counter_ns() - started
                return
        raise self.ClosedResourceError

    def _busy_poll_once(self, started: int) -> list[tuple[int, int]]:
        """Poll without sleeping until something is ready or the window ends."""
        poll = self._poll.poll
        deadline = started + self._busy_poll
        now = started
        ready = poll(0)
        while not ready:
            then, now = now, time.perf_counter_ns()
            if now - then > PREEMPTED_NS:  # first: a preemption often outlasts the window
                self._backoff = BACKOFF_WAITS
                break
            if now >= deadline:
                break
            ready = poll(0)
        return ready

    def _take_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for signum in os.read(self._wake_r, 512):
                if signum in STOP_SIGNALS and self.stop_signal is None:
                    self.stop_signal = signal.Signals(signum)
                    log.info("received %s, unmounting", self.stop_signal.name)
                    pyfuse3.terminate()  # sets the session's exit flag, then notify_closing

    def serve(self, unblocked_mask: set[signal.Signals]) -> None:
        """Serve requests until the filesystem is unmounted or a stop signal arrives."""
        saved = {signum: signal.signal(signum, _ignore_signal) for signum in STOP_SIGNALS}
        saved_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        saved_loop = pyfuse3.trio
        pyfuse3.trio = self
        try:
            # SIGINT/SIGTERM were blocked from before the mount existed: one
            # sent since then is pending, lands in the wakeup pipe now, and
            # ends the first wait.
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked_mask)
            self.run(pyfuse3.main(1, 1))
        finally:
            pyfuse3.trio = saved_loop
            signal.set_wakeup_fd(saved_wakeup)
            for signum, handler in saved.items():
                signal.signal(signum, handler)


def _ignore_signal(signum: int, frame: object) -> None:
    # The wakeup fd carries the signal to the request loop; a handler must be
    # installed for it to be written, and must not raise.
    return None
