"""Hashing a build in forked processes (occlumfs.merkle.forkmap): the same image bytes as
threads, errors that name what failed, and no worker left behind. The forking cases
run in a fresh interpreter (merkle/forkmap_cases.py): this process may have threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import occlumfs
from merkle.trees import make_golden_tree
from occlumfs.errors import OcclumfsError
from occlumfs.merkle import build, build_image
from occlumfs.merkle.forkmap import can_fork, fork_map

CASES = Path(__file__).with_name("forkmap_cases.py")
TESTS = CASES.parent.parent
REPO = Path(occlumfs.__file__).resolve().parent.parent


def _fresh(case: str, *args: object) -> str:
    """Run ``case`` of forkmap_cases.py in a new interpreter; its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    done = subprocess.run(
        [sys.executable, str(CASES), case, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "case",
    [
        "order",
        "first_error",
        "dead_worker",
        "too_many_items",
        "two_rounds",
        "second_round_errors",
        "stream_pool",
        "stream_pool_errors",
    ],
)
def test_fork_map(case):
    _fresh(case)


def test_fork_map_refuses_a_threaded_process():
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
    (src / "many" / "big").write_bytes(os.urandom(3 << 20))  # more than a small file
    (src / "many" / "big-holes").write_bytes(os.urandom(9000) + bytes(3 << 20) + b"end")
    forked = _fresh("build_forked", src, tmp_path / "forked.img").strip()
    single = build_image(src, tmp_path / "single.img", jobs=1)
    monkeypatch.setattr(build, "can_fork", lambda: False)
    threaded = build_image(src, tmp_path / "threaded.img", jobs=2)
    assert forked == single == threaded
    data = (tmp_path / "forked.img").read_bytes()
    assert (
        data == (tmp_path / "single.img").read_bytes() == (tmp_path / "threaded.img").read_bytes()
    )


def _many_files(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(300):
        (src / "d" / f"f{i}").write_bytes(b"x" * 5000)
    return src, src / "d" / "f250"


def test_a_source_file_gone_before_forked_hashing_is_one_clear_error(tmp_path):
    src, victim = _many_files(tmp_path)
    out = _fresh("build_error", src, tmp_path / "out.img", victim)
    assert out == f"mkimage: {victim}: No such file or directory\n"
    assert list(tmp_path.iterdir()) == [src]  # no image, no scratch file


def _threaded_after_scan(monkeypatch, src: Path, image: Path, between) -> OcclumfsError:
    """Build in threads, calling ``between()`` right after the scan: the error."""
    scan = build.scan_directory

    def scan_then(root):
        tree = scan(root)
        between()
        return tree

    monkeypatch.setattr(build, "scan_directory", scan_then)
    monkeypatch.setattr(build, "can_fork", lambda: False)
    with pytest.raises(OcclumfsError) as raised:
        build_image(src, image, jobs=2)
    return raised.value


def test_the_same_error_from_hashing_threads(tmp_path, monkeypatch):
    src, victim = _many_files(tmp_path)
    error = _threaded_after_scan(monkeypatch, src, tmp_path / "out.img", victim.unlink)
    assert str(error) == f"mkimage: {victim}: No such file or directory"
    assert list(tmp_path.iterdir()) == [src]


def test_a_source_file_changed_during_the_build_is_caught_forked_or_threaded(tmp_path, monkeypatch):
    src, victim = _many_files(tmp_path)
    victim.write_bytes(b"ab" * 2500)  # same size as the others, not all one byte
    os.utime(victim, ns=(10**18, 10**18))  # so that the rewrite surely moves its mtime
    out = _fresh("build_changed", src, tmp_path / "out.img", victim)
    assert out == f"{victim}: changed during the build\n"
    assert list(tmp_path.iterdir()) == [src]

    os.utime(victim, ns=(10**18, 10**18))
    error = _threaded_after_scan(
        monkeypatch, src, tmp_path / "out.img", lambda: victim.write_bytes(b"ba" * 2500)
    )
    assert str(error) == f"{victim}: changed during the build"
    assert list(tmp_path.iterdir()) == [src]
