"""``StreamPool``: forked workers fed while the caller still produces their work.

Why: :func:`occlumfs.merkle.forkmap.fork_map` forks once every item exists, so a
build scanned the whole tree (~20 ms for the stdlib, one core busy, the other
idle) before anything was hashed. Here the builder forks as soon as its first
batch of files is scanned and sends each batch to a worker as data (marshal:
paths and numbers, nothing from the parent's memory), then keeps scanning.

Two rounds, as with fork_map: ``func(payload)`` returns ``(result, kept)``; the
result goes back to the caller (``on_result(index, result)``), ``kept`` stays in
the worker; later :meth:`send_plans` sends each worker one plan per item it
computed and it runs ``finish(kept, plan)`` (:meth:`wait` for the end). A batch
goes to the worker with the least work outstanding (``cost``: bytes to hash), at
most :data:`AHEAD` batches ahead of it. Errors travel back as in fork_map; the lowest item's is
raised. A worker that dies makes the call fail; :meth:`close` kills and reaps
every worker, Ctrl-C included.
"""

from __future__ import annotations

import _signal
import os
import select
from collections.abc import Callable

from occlumfs.errors import OcclumfsError
from occlumfs.merkle.forkmap import (
    _LENGTH,
    _Child,
    _dumps,
    _large_pipe,
    _loads,
    _send,
    can_fork,
    end_workers,
    run_plans,
)

# Batches sent to one worker and not answered yet, at most: one queued behind the
# one it hashes, so it never waits for the next, and at the end one worker is
# left with at most one batch (~5 ms) more than the other (with 4: 7-13 ms of one
# core idle at the end of a stdlib build's hashing).
AHEAD = 2


class _Worker(_Child):
    """A worker as the parent sees it: ``plan_w`` carries items, then plans."""

    __slots__ = ("cost", "sent")

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0  # items sent, not answered
        self.cost = 0  # their cost


class StreamPool:
    def __init__(
        self,
        func: Callable,
        finish: Callable,
        workers: int,
        on_result: Callable[[int, object], None],
    ) -> None:
        if not can_fork():
            raise RuntimeError("StreamPool needs a process with a single thread")
        self.on_result = on_result
        self.errors: dict[int, BaseException] = {}
        self.costs: dict[int, int] = {}  # cost of each item not answered yet
        self.workers: dict[int, _Worker] = {}  # result pipe -> worker
        self._inbox = memoryview(bytearray(256 << 10))
        try:
            for _ in range(max(1, workers)):
                self._start(func, finish)
        except BaseException:
            self.close()
            raise

    def _start(self, func: Callable, finish: Callable) -> None:
        child = _Worker()
        todo_r, child.plan_w = _large_pipe()
        out_r, out_w = _large_pipe()
        child.pid = os.fork()
        if child.pid == 0:  # the worker: never returns
            for fd in [out_r, child.plan_w, *self.workers]:
                os.close(fd)
            for other in self.workers.values():
                os.close(other.plan_w)
            _serve(func, finish, todo_r, out_w)
        os.close(todo_r)
        os.close(out_w)
        os.set_blocking(child.plan_w, False)  # never wait on a worker that waits on us
        self.workers[out_r] = child

    def submit(self, index: int, payload: object, cost: int) -> None:
        """Send item ``index`` to the least loaded worker (waiting for one with room)."""
        while True:
            room = [c for c in self.workers.values() if c.sent < AHEAD]
            if room:
                child = min(room, key=lambda c: c.cost)
                break
            self.poll(None)
        child.sent += 1
        child.cost += cost
        self.costs[index] = cost
        child.indices.append(index)
        self._write(child, ("item", index, payload))

    def gather(self) -> None:
        """Wait for every item's answer; raise the lowest item's error."""
        while self.costs:
            self.poll(None)
        if self.errors:
            raise self.errors[min(self.errors)]

    def send_plans(self, plans: Callable[[int], object]) -> None:
        """Start the second round: ``plans(index)`` for each item, to the worker
        that computed it."""
        for child in self.workers.values():
            self._write(child, ("plans", {i: plans(i) for i in child.indices}))
            os.close(child.plan_w)
            child.plan_w = -1

    def wait(self) -> None:
        """Wait until every worker is done; raise the lowest item's error."""
        while not all(child.done for child in self.workers.values()):
            self.poll(None)
        if self.errors:
            raise self.errors[min(self.errors)]

    def poll(self, timeout: float | None = 0) -> None:
        """Take the answers that have come in (waiting up to ``timeout`` for one)."""
        open_fds = [fd for fd, child in self.workers.items() if not child.done]
        if not open_fds:
            return
        ready, _, _ = select.select(open_fds, [], [], timeout)
        for fd in ready:
            self._read(fd)

    def _read(self, fd: int) -> None:
        child = self.workers[fd]
        # Into one reused buffer: a fresh 1 MiB one each read cost a page fault
        # for every 4 KiB of the answers (~850 KB of hashes a stdlib build).
        got = os.readv(fd, [self._inbox])
        if not got:
            raise _died(child)
        child.buf += self._inbox[:got]
        for kind, index, value in _take_messages(child.buf):
            if kind == "done":
                child.done = True
                continue
            if kind != "finished" and index in self.costs:  # a first-round answer
                child.sent -= 1
                child.cost -= self.costs.pop(index)
            if kind == "error":
                self.errors[index] = value
            elif kind == "ok":
                self.on_result(index, value)

    def _write(self, child: _Worker, message: tuple) -> None:
        payload = _dumps(message)
        data = memoryview(_LENGTH.pack(len(payload)) + payload)
        while data:
            try:
                data = data[os.write(child.plan_w, data) :]
            except BrokenPipeError:
                raise _died(child) from None
            except BlockingIOError:
                # Its pipe is full: take answers (the worker may be waiting to
                # send one) until it has room.
                ready, _, _ = select.select(list(self.workers), [child.plan_w], [])
                for fd in ready:
                    self._read(fd)

    def close(self) -> None:
        workers, self.workers = self.workers, {}
        end_workers(workers)

    def __enter__(self) -> StreamPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _died(child: _Worker) -> OcclumfsError:
    return OcclumfsError(f"a hashing worker (pid {child.pid}) died before finishing")


def _take_messages(buf: bytearray) -> list:
    """Every complete message at the front of ``buf``, taken off it."""
    out, at = [], 0
    with memoryview(buf) as view:  # each message parsed in place, not copied out first
        while len(buf) - at >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buf, at)
            end = at + _LENGTH.size + length
            if len(buf) < end:
                break
            out.append(_loads(view[at + _LENGTH.size : end]))
            at = end
    del buf[:at]
    return out


def _serve(func: Callable, finish: Callable, todo: int, out: int) -> None:
    """A worker: items, then plans, from ``todo`` until end of file; answers to ``out``."""
    status = 0
    try:
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # Ctrl-C: the parent reports it
        kept: dict[int, object] = {}
        buf = bytearray()
        while chunk := os.read(todo, 1 << 20):
            buf += chunk
            for message in _take_messages(buf):
                _handle(message, func, finish, kept, out)
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _handle(message: tuple, func: Callable, finish: Callable, kept: dict, out: int) -> None:
    if message[0] == "item":
        _, index, payload = message
        try:
            value, kept[index] = func(payload)
            answer = ("ok", index, value)
        except Exception as exc:
            answer = ("error", index, exc)
        _send(out, answer)
    else:  # the plans
        run_plans(finish, kept, message[1], out)
