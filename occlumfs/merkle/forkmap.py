"""``fork_map``: a function over a list in forked worker processes, results in order.

Why: the builder hashes every 4 KiB block of every file with one ``sha256``
call each; threads doing that contend for the GIL (two of them measured slower
than one, docs/performance.md, issue 11), processes do not. A fork shares the
parent's loaded modules and the list, so a worker starts in about a millisecond
and needs no arguments sent; only the results travel back (marshalled, or pickled, over a
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

import _signal  # signal's numbers without its enums (~2 ms of start-up)
import _thread
import contextlib
import marshal
import os
import select
import struct
from collections.abc import Callable, Sequence

from occlumfs.errors import OcclumfsError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing
if TYPE_CHECKING:
    from typing import Any

_INDEX = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
MAX_ITEMS = 65536 // _INDEX.size


def can_fork() -> bool:
    # Every Python thread but the main one, however started (threading starts
    # them through _thread); asking threading would load it (~3 ms of start-up).
    return hasattr(os, "fork") and _thread._count() == 0


def fork_map(
    func: Callable[[Any], Any],
    items: Sequence[Any],
    workers: int,
    *,
    plan: Callable[[list[Any]], Sequence[Any]] | None = None,
    finish: Callable[[Any, Any], None] | None = None,
    on_result: Callable[[int, Any], None] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> list[Any]:
    """``[func(item) for item in items]``, computed by ``workers`` forked processes.

    With ``plan`` and ``finish``, a second round follows in the same workers:
    ``func`` returns ``(result, kept)`` and the worker keeps ``kept`` (say, the
    bytes it read); once every result is in, ``plan(results)`` (in the caller)
    gives one plan per item, and the worker that computed item ``i`` runs
    ``finish(kept_i, plans[i])``. The first error of either round is raised.
    ``on_result(i, result)`` is called in the caller as each first-round result
    comes in (in any order), while the workers go on; ``meanwhile()`` once the
    plans are sent, while the workers finish.
    """
    if not can_fork():
        raise RuntimeError("fork_map needs a process with a single thread")
    if len(items) > MAX_ITEMS:
        raise ValueError(f"fork_map takes at most {MAX_ITEMS} items")
    results: list[Any] = [None] * len(items)
    errors: dict[int, BaseException] = {}
    todo_r, todo_w = os.pipe2(os.O_CLOEXEC)
    children: dict[int, _Child] = {}  # result pipe -> worker
    try:
        # Every index up front (a pipe holds 64 KiB), then end of file.
        os.write(todo_w, b"".join(_INDEX.pack(i) for i in range(len(items))))
        os.close(todo_w)
        todo_w = -1
        for _ in range(max(1, min(workers, len(items)))):
            child = _Child()
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            plan_r, child.plan_w = _large_pipe() if finish else (-1, -1)
            child.pid = os.fork()
            if child.pid == 0:  # the worker: never returns
                # Not the other workers' pipes: a plan pipe still open here would
                # never reach end of file for its own worker.
                for fd in [*children, *(c.plan_w for c in (*children.values(), child))]:
                    if fd >= 0:
                        os.close(fd)
                _work(func, items, todo_r, out_w, plan_r, finish)
            os.close(out_w)
            if plan_r >= 0:
                os.close(plan_r)
            children[out_r] = child
        _collect(children, results, errors, on_result)
        if finish is not None and not errors:
            plans = plan(results)
            for child in children.values():
                _send_plans(child, {i: plans[i] for i in child.indices})
            if meanwhile is not None:
                meanwhile()
            _collect(children, results, errors, None)
    finally:
        os.close(todo_r)
        if todo_w >= 0:
            os.close(todo_w)
        end_workers(children)
    if errors:
        raise errors[min(errors)]
    return results


def end_workers(children: dict[int, _Child]) -> None:
    """Close each worker's pipes (keyed by its answer pipe), kill it and reap it."""
    for fd, child in children.items():
        os.close(fd)
        if child.plan_w >= 0:
            os.close(child.plan_w)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, _signal.SIGKILL)  # a worker still running has nothing to save
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)


def _large_pipe() -> tuple[int, int]:
    """A pipe of 1 MiB, e.g. for a worker's plans: sending them does not wait for
    the worker to be scheduled (a stdlib build's plans are ~70 KiB; a pipe holds
    64 KiB by default)."""
    import fcntl

    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # beyond the host's pipe-max-size: keep 64 KiB
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    return r, w


class _Child:
    """A worker as the parent sees it."""

    __slots__ = ("buf", "done", "indices", "pid", "plan_w")

    def __init__(self) -> None:
        self.pid = -1
        self.plan_w = -1
        self.buf = bytearray()
        self.indices: list[int] = []  # the items it computed
        self.done = False  # it finished the current round


def _send_plans(child: _Child, plans: dict[int, Any]) -> None:
    data = memoryview(_dumps(plans))
    try:
        while data:
            data = data[os.write(child.plan_w, data) :]
    except BrokenPipeError:
        pass  # it died: the next round's read says so
    os.close(child.plan_w)
    child.plan_w = -1
    child.done = False


def _collect(children: dict[int, _Child], results: list[Any], errors: dict, on_result) -> None:
    """Read every worker's answers until each says the round is done."""
    pending = {fd for fd, child in children.items() if not child.done}
    while pending:
        ready, _, _ = select.select(list(pending), [], [])
        for fd in ready:
            child = children[fd]
            got = os.read(fd, 1 << 20)
            if not got:
                raise OcclumfsError(f"a hashing worker (pid {child.pid}) died before finishing")
            child.buf += got
            _unpack(child, results, errors, on_result)
            if child.done:
                pending.discard(fd)


def _unpack(child: _Child, results: list[Any], errors: dict, on_result) -> None:
    """Take every complete answer off the front of ``child.buf``."""
    buf = child.buf
    at = 0
    while len(buf) - at >= _LENGTH.size:
        (length,) = _LENGTH.unpack_from(buf, at)
        if len(buf) - at - _LENGTH.size < length:
            break
        at += _LENGTH.size
        with memoryview(buf) as view:
            kind, index, value = _loads(view[at : at + length])
        at += length
        if kind == "done":
            child.done = True
        elif kind == "ok":
            results[index] = value
            child.indices.append(index)
            if on_result is not None:
                on_result(index, value)
        elif kind == "finished":
            pass
        else:
            errors[index] = value
    del buf[:at]


def _work(func, items, todo: int, out: int, plans: int, finish) -> None:
    status = 0
    try:
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # Ctrl-C: the parent reports it
        kept = {}
        while True:
            got = os.read(todo, _INDEX.size)
            if len(got) != _INDEX.size:
                break
            (index,) = _INDEX.unpack(got)
            try:
                value = func(items[index])
                if finish is not None:
                    value, kept[index] = value
                answer = ("ok", index, value)
            except Exception as exc:
                answer = ("error", index, exc)
            _send(out, answer)
        _send(out, ("done", -1, None))
        if finish is not None:
            _finish(finish, kept, plans, out)
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _finish(finish, kept: dict, plans: int, out: int) -> None:
    """The second round: this worker's plans, read to end of file, then ``finish`` each."""
    chunks = []
    while chunk := os.read(plans, 1 << 20):
        chunks.append(chunk)
    if not chunks:
        return  # the parent gave up (an error in the first round)
    run_plans(finish, kept, _loads(b"".join(chunks)), out)


def run_plans(finish, kept: dict, plans: dict, out: int) -> None:
    """``finish(kept[i], plan)`` for each item's plan, in item order, each answered
    on ``out``, then the end of the round."""
    for index, item_plan in sorted(plans.items()):
        try:
            finish(kept.pop(index), item_plan)
            answer = ("finished", index, None)
        except Exception as exc:
            answer = ("error", index, exc)
        _send(out, answer)
    _send(out, ("done", -1, None))


def _encode(value: Any) -> tuple[bytes, bytes]:
    """``value`` as (a tag, bytes): by marshal when it holds only plain data (ints,
    bytes, tuples, lists, dicts, None), else by pickle. Marshal is built in: the
    builder's start-up does not load pickle (and the re module it loads).
    Bytes-like values arrive as bytes."""
    try:
        return b"m", marshal.dumps(value)
    except ValueError:  # an exception, an instance: what pickle is for
        import pickle

        return b"p", pickle.dumps(value, pickle.HIGHEST_PROTOCOL)


def _dumps(value: Any) -> bytes:
    return b"".join(_encode(value))


def _loads(data: bytes | bytearray | memoryview) -> Any:
    if data[:1] == b"m":
        return marshal.loads(memoryview(data)[1:])
    import pickle

    return pickle.loads(memoryview(data)[1:])


def _send(fd: int, answer: tuple) -> None:
    """One answer, framed, in one ``writev`` (a worker's hashes are ~400 KB a build:
    no copies of them into fresh memory, which costs a page fault a 4 KiB)."""
    try:
        tag, body = _encode(answer)
    except Exception as exc:  # an exception that does not pickle: keep its message
        tag, body = _encode(("error", answer[1], OcclumfsError(str(exc))))
    parts = [_LENGTH.pack(len(tag) + len(body)), tag, body]
    done = os.writev(fd, parts)
    if done < _LENGTH.size + len(tag) + len(body):  # a partial write: the rest as it goes
        data = memoryview(b"".join(parts))[done:]
        while data:
            data = data[os.write(fd, data) :]
