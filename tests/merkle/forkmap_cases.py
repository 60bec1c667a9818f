"""Cases of test_merkle_forkmap.py that must run in a process with one thread.

pytest's own process may have threads left by other tests, where forking is
(rightly) refused; each case here runs in a fresh interpreter started by the test,
with its arguments on the command line, and fails by raising.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from occlumfs.errors import OcclumfsError
from occlumfs.merkle import build, build_image
from occlumfs.merkle.forkmap import MAX_ITEMS, can_fork, fork_map
from occlumfs.merkle.streampool import StreamPool


def no_children_left() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def _square_or_fail(n: int) -> int:
    if n in (7, 3):
        raise OcclumfsError(f"item {n} is bad")
    return n * n


def _die_on_five(n: int) -> int:
    if n == 5:
        os._exit(3)
    return n


def order() -> None:
    assert can_fork()
    items = list(range(500))
    got = fork_map(lambda n: (n, os.getpid()), items, 3)
    assert [n for n, _ in got] == items
    assert os.getpid() not in {pid for _, pid in got}  # computed in the workers
    assert no_children_left()


def first_error() -> None:
    try:
        fork_map(_square_or_fail, list(range(10)), 2)
    except OcclumfsError as exc:
        assert str(exc) == "item 3 is bad", exc
    else:
        raise AssertionError("no error")
    assert no_children_left()


def dead_worker() -> None:
    try:
        fork_map(_die_on_five, list(range(10)), 2)
    except OcclumfsError as exc:
        assert "died before finishing" in str(exc), exc
    else:
        raise AssertionError("no error")
    assert no_children_left()


def too_many_items() -> None:
    try:
        fork_map(abs, [0] * (MAX_ITEMS + 1), 2)
    except ValueError:
        return
    raise AssertionError("no error")


def _keep(n: int) -> tuple[int, tuple[int, int]]:
    return n * n, (n, os.getpid())


def two_rounds() -> None:
    """Each item's kept value reaches its plan in the worker that computed it."""
    seen_r, seen_w = os.pipe()
    items = list(range(200))

    def finish(kept, plan) -> None:
        n, pid = kept
        assert pid == os.getpid() and plan == n + 1000, (kept, plan)
        os.write(seen_w, f"{n}\n".encode())

    arrived = []  # in the caller, as each first-round result comes in

    def plan(results):
        assert sorted(arrived) == [(n, n * n) for n in items]  # all before the plan
        return [r**0.5 + 1000 for r in results]

    got = fork_map(
        _keep, items, 2, plan=plan, finish=finish, on_result=lambda i, r: arrived.append((i, r))
    )
    os.close(seen_w)
    with os.fdopen(seen_r) as seen:
        finished = sorted(int(line) for line in seen)
    assert got == [n * n for n in items]
    assert finished == items
    assert no_children_left()


def second_round_errors() -> None:
    def finish(kept, plan) -> None:
        if kept[0] in (9, 4):
            raise OcclumfsError(f"cannot finish {kept[0]}")

    try:
        fork_map(_keep, list(range(12)), 2, plan=lambda r: r, finish=finish)
    except OcclumfsError as exc:
        assert str(exc) == "cannot finish 4", exc
    else:
        raise AssertionError("no error")
    assert no_children_left()

    def die(kept, plan) -> None:
        os._exit(3)

    try:
        fork_map(_keep, list(range(12)), 2, plan=lambda r: r, finish=die)
    except OcclumfsError as exc:
        assert "died before finishing" in str(exc), exc
    else:
        raise AssertionError("no error")
    assert no_children_left()

    def bad_plan(results):
        raise OcclumfsError("no plan")

    try:
        fork_map(_keep, list(range(12)), 2, plan=bad_plan, finish=die)
    except OcclumfsError as exc:
        assert str(exc) == "no plan", exc
    else:
        raise AssertionError("no error")
    assert no_children_left()


def _stream(func, finish, n: int):
    """Items 0..n-1 through a StreamPool of 2 (costs uneven), both rounds; the
    first-round results and the plans each worker finished, by item."""
    results: dict[int, object] = {}
    with StreamPool(func, finish, 2, results.__setitem__) as pool:
        for i in range(n):
            pool.submit(i, {"n": i}, cost=1 + i % 5)  # sent as data, not shared memory
        pool.gather()
        pool.send_plans(lambda i: i + 1000)
        pool.wait()
    return results


def stream_pool() -> None:
    """Every item's result comes back once; each kept value reaches its plan in the
    worker that computed it; both workers take items; none is left running."""
    seen_r, seen_w = os.pipe()

    def func(payload):
        return payload["n"] * 2, (payload["n"], os.getpid())

    def finish(kept, plan) -> None:
        n, pid = kept
        assert pid == os.getpid() and plan == n + 1000, (kept, plan)
        os.write(seen_w, f"{n} {pid}\n".encode())

    results = _stream(func, finish, 300)
    os.close(seen_w)
    with os.fdopen(seen_r) as seen:
        finished = [tuple(map(int, line.split())) for line in seen]
    assert results == {n: n * 2 for n in range(300)}
    assert sorted(n for n, _ in finished) == list(range(300))
    assert len({pid for _, pid in finished} - {os.getpid()}) == 2
    assert no_children_left()


def stream_pool_errors() -> None:
    """The lowest failing item's error, from either round; a dead worker is one
    clear error; workers reaped either way."""

    def first(payload):
        if payload["n"] in (40, 17):
            raise OcclumfsError(f"item {payload['n']} is bad")
        return payload["n"], payload["n"]

    for func, finish, want in (
        (first, lambda kept, plan: None, "item 17 is bad"),
        (lambda p: (p["n"], p["n"]), _fail_on_nine_or_four, "cannot finish 4"),
        (_die_on_fifty, lambda kept, plan: None, "died before finishing"),
        (lambda p: (p["n"], p["n"]), lambda kept, plan: os._exit(3), "died before finishing"),
    ):
        try:
            _stream(func, finish, 120)
        except OcclumfsError as exc:
            assert want in str(exc), (want, exc)
        else:
            raise AssertionError(f"no error, wanted {want!r}")
        assert no_children_left()


def _fail_on_nine_or_four(kept, plan) -> None:
    if kept in (9, 4):
        raise OcclumfsError(f"cannot finish {kept}")


def _die_on_fifty(payload):
    if payload["n"] == 50:
        os._exit(3)
    return payload["n"], payload["n"]


def build_forked(src: str, image: str) -> None:
    """Build with forked hashing and copying (checked), print the digest."""
    calls = []

    def spy(real):
        return lambda func, *a, **kw: calls.append(func.__name__) or real(func, *a, **kw)

    build.fork_map, build.StreamPool = spy(build.fork_map), spy(build.StreamPool)
    print(build_image(Path(src), Path(image), jobs=2))
    # One set of workers, started during the scan, hashes and copies.
    assert calls == ["hash_payload"], calls
    assert no_children_left()


def _build_after_scan(src: str, image: str, victim: str, between) -> None:
    """Build with forked workers, calling ``between()`` once the scan has seen
    ``victim``, before it is handed over to be hashed (the workers hash while
    the scan goes on); print the one-line error."""
    scan = build.scan_directory
    victim_path = os.fsencode(os.path.abspath(victim))

    def scan_then(root, on_file=None):
        assert on_file is not None  # a streamed build

        def hand_over(node):
            if node.content.path == victim_path:
                between()
            on_file(node)

        return scan(root, hand_over)

    build.scan_directory = scan_then
    assert can_fork()
    try:
        build_image(Path(src), Path(image), jobs=2)
    except OcclumfsError as exc:
        print(exc)
    assert no_children_left()


def build_error(src: str, image: str, victim: str) -> None:
    """Delete ``victim`` between its scan and its hashing; print the one-line error."""
    _build_after_scan(src, image, victim, lambda: os.unlink(victim))


def build_changed(src: str, image: str, victim: str) -> None:
    """Rewrite ``victim`` (same size) between its scan and its hashing; print the error."""
    path = Path(victim)
    _build_after_scan(src, image, victim, lambda: path.write_bytes(path.read_bytes()[::-1]))


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
