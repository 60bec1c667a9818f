"""Hashing a build in forked processes (occlumfs.merkle.forkmap): the same image bytes as
threads, errors that name what failed, and no worker left behind."""

from __future__ import annotations

import os
import threading

import pytest

from merkle.trees import make_golden_tree
from occlumfs.errors import OcclumfsError
from occlumfs.merkle import build, build_image
from occlumfs.merkle.forkmap import MAX_ITEMS, can_fork, fork_map


def _no_children_left() -> bool:
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


def test_fork_map_keeps_the_order_across_workers():
    items = list(range(500))
    got = fork_map(lambda n: (n, os.getpid()), items, 3)
    assert [n for n, _ in got] == items
    assert os.getpid() not in {pid for _, pid in got}  # computed in the workers
    assert _no_children_left()


def test_fork_map_raises_the_first_items_error():
    with pytest.raises(OcclumfsError, match="item 3 is bad"):
        fork_map(_square_or_fail, list(range(10)), 2)
    assert _no_children_left()


def test_a_worker_that_dies_fails_the_call():
    with pytest.raises(OcclumfsError, match="died before finishing"):
        fork_map(_die_on_five, list(range(10)), 2)
    assert _no_children_left()


def test_fork_map_refuses_a_threaded_process_and_too_many_items():
    assert can_fork()
    with pytest.raises(ValueError):
        fork_map(abs, [0] * (MAX_ITEMS + 1), 2)
    started = threading.Event()
    stop = threading.Event()
    other = threading.Thread(target=lambda: (started.set(), stop.wait()))
    other.start()
    try:
        started.wait()
        assert not can_fork()
        with pytest.raises(RuntimeError):
            fork_map(abs, [1], 2)
    finally:
        stop.set()
        other.join()


def test_forked_threaded_and_single_hashing_build_the_same_bytes(tmp_path, monkeypatch):
    src = make_golden_tree(tmp_path / "src")
    (src / "many").mkdir()
    for i in range(600):  # more than one batch of small files
        (src / "many" / f"f{i:03d}").write_bytes(bytes([i % 251]) * (i * 37 % 9000 + 1))
    calls = []
    real = build.fork_map
    monkeypatch.setattr(build, "fork_map", lambda *a: calls.append(1) or real(*a))
    forked = build_image(src, tmp_path / "forked.img", jobs=2)
    assert calls  # the forked path ran
    single = build_image(src, tmp_path / "single.img", jobs=1)
    monkeypatch.setattr(build, "can_fork", lambda: False)
    threaded = build_image(src, tmp_path / "threaded.img", jobs=2)
    assert len(calls) == 1
    assert forked == single == threaded
    data = (tmp_path / "forked.img").read_bytes()
    assert (
        data == (tmp_path / "single.img").read_bytes() == (tmp_path / "threaded.img").read_bytes()
    )
    assert _no_children_left()


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "threads"])
def test_a_source_file_gone_before_hashing_is_one_clear_error(tmp_path, monkeypatch, forked):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(300):
        (src / "d" / f"f{i}").write_bytes(b"x" * 5000)
    victim = src / "d" / "f250"
    scan = build.scan_directory

    def scan_then_delete(root):
        tree = scan(root)
        victim.unlink()  # gone between the scan and the hashing
        return tree

    monkeypatch.setattr(build, "scan_directory", scan_then_delete)
    if not forked:
        monkeypatch.setattr(build, "can_fork", lambda: False)
    with pytest.raises(OcclumfsError) as raised:
        build_image(src, tmp_path / "out.img", jobs=2)
    assert str(raised.value) == f"mkimage: {victim}: No such file or directory"
    assert list(tmp_path.iterdir()) == [src]  # no image, no scratch file
    assert _no_children_left()
