"""``fork_map``: a function over a list in forked worker processes, results in order.

Why: the builder hashes every 4 KiB block of every file with one ``sha256``
call each; threads doing that contend for the GIL (two of them measured slower
than one, docs/performance.md, issue 11), processes do not. A fork shares the
parent's loaded modules and the list, so a worker starts in about a millisecond
and needs no arguments sent; only the results travel back (pickled, over a
pipe per worker).

Forking is only safe in a process with one thread (another thread could hold a
lock the child would then wait on forever), so :func:`can_fork` says whether a
caller may use it; builders fall back to threads otherwise.

Workers take items from a shared pipe of indices, so a large item does not
hold up the others. A worker that fails sends its exception (the lowest item's
error is raised, as ``map`` over the list would), a worker that dies without
answering makes the call fail, and the parent kills and reaps every worker
before it returns or raises, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

from occlumfs.errors import OcclumfsError

_INDEX = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
MAX_ITEMS = 65536 // _INDEX.size


def can_fork() -> bool:
    return hasattr(os, "fork") and threading.active_count() == 1


def fork_map(func: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[func(item) for item in items]``, computed by ``workers`` forked processes."""
    if not can_fork():
        raise RuntimeError("fork_map needs a process with a single thread")
    if len(items) > MAX_ITEMS:
        raise ValueError(f"fork_map takes at most {MAX_ITEMS} items")
    results: list[Any] = [None] * len(items)
    errors: dict[int, BaseException] = {}
    todo_r, todo_w = os.pipe2(os.O_CLOEXEC)
    children: dict[int, int] = {}  # result pipe -> pid
    try:
        # Every index up front (a pipe holds 64 KiB), then end of file.
        os.write(todo_w, b"".join(_INDEX.pack(i) for i in range(len(items))))
        os.close(todo_w)
        todo_w = -1
        for _ in range(max(1, min(workers, len(items)))):
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
            if pid == 0:  # the worker: never returns
                _work(func, items, todo_r, out_w)
            os.close(out_w)
            children[out_r] = pid
        _collect(children, results, errors)
    finally:
        os.close(todo_r)
        if todo_w >= 0:
            os.close(todo_w)
        for fd, pid in children.items():
            os.close(fd)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # a worker still running has nothing to save
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    if errors:
        raise errors[min(errors)]
    return results


def _collect(children: dict[int, int], results: list[Any], errors: dict) -> None:
    """Read every worker's answers until each reaches end of file."""
    pending = {fd: bytearray() for fd in children}
    while pending:
        ready, _, _ = select.select(list(pending), [], [])
        for fd in ready:
            got = os.read(fd, 1 << 20)
            if got:
                pending[fd] += got
                continue
            _unpack(pending.pop(fd), results, errors, children[fd])


def _unpack(buf: bytearray, results: list[Any], errors: dict, pid: int) -> None:
    at = 0
    finished = False
    while at < len(buf):
        (length,) = _LENGTH.unpack_from(buf, at)
        at += _LENGTH.size
        kind, index, value = pickle.loads(buf[at : at + length])
        at += length
        if kind == "done":
            finished = True
        elif kind == "ok":
            results[index] = value
        else:
            errors[index] = value
    if not finished:
        raise OcclumfsError(f"a hashing worker (pid {pid}) died before finishing")


def _work(func, items, todo: int, out: int) -> None:
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: the parent reports it
        while True:
            got = os.read(todo, _INDEX.size)
            if len(got) != _INDEX.size:
                break
            (index,) = _INDEX.unpack(got)
            try:
                answer = ("ok", index, func(items[index]))
            except Exception as exc:
                answer = ("error", index, exc)
            _send(out, answer)
        _send(out, ("done", -1, None))
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _send(fd: int, answer: tuple) -> None:
    try:
        payload = pickle.dumps(answer, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # an exception that does not pickle: keep its message
        payload = pickle.dumps(("error", answer[1], OcclumfsError(str(exc))))
    data = memoryview(_LENGTH.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data) :]
