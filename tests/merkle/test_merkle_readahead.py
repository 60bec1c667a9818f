"""Sequential reads hashed by worker processes (occlumfs.merkle.hashers): the same bytes
and the same errors as verifying in place, no worker outlives its image, and only a
long stream starts them (a program's few-MB binary never does), without waiting."""

from __future__ import annotations

import errno
import logging
import os
import random
import resource
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import process_exited, run_cli

from merkle.trees import big_file_tree
from occlumfs.errors import IntegrityError
from occlumfs.merkle import build_image, open_image_fs
from occlumfs.merkle.format import BLOCK_SIZE
from occlumfs.merkle.hashers import START_BLOCKS, _worker_count
from occlumfs.mount import mount_record, mounted_paths, wait_for_exit

MiB = 1 << 20
START = START_BLOCKS * BLOCK_SIZE  # bytes of one stream before workers start
SIZE = START + 8 * MiB + 5 * BLOCK_SIZE + 3
KEY = bytes(range(16))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, bytes]:
    src = tmp_path_factory.mktemp("workers") / "src"
    return src, big_file_tree(src, SIZE, 5, {"small": b"small file"})


def _built(src: Path, tmp_path: Path, key: bytes | None = None) -> tuple[Path, str]:
    image = tmp_path / "big.img"
    return image, build_image(src, image, key=key)


@contextmanager
def _opened(image: Path, digest: str, key: bytes | None):
    """(the image's filesystem, a handle of big.bin), closed on leaving."""
    fs = open_image_fs(image, digest=digest, key=key)
    try:
        yield fs, fs.open(fs.lookup(1, b"big.bin").ino, os.O_RDONLY)
    finally:
        fs.close()


def _flip(image: Path, digest: str, key: bytes | None, file_block: int) -> None:
    fs = open_image_fs(image, digest=digest, key=key)
    try:
        rec = fs.record(fs.lookup(1, b"big.bin").ino)
        ((_, data, _),) = list(fs.extents(rec))
        at = (fs.reader.layout.data_start + data + file_block) * BLOCK_SIZE + 77
    finally:
        fs.close()
    with open(image, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x08]))


def _read(fs, fh, off: int) -> bytes:
    """fs.read of 1 MiB; once that started the workers, wait until they are up, so the
    reads after it are the workers' (the server itself never waits for them)."""
    chunk = fs.read(fh, off, MiB)
    ahead = fs.reader.read_ahead
    if ahead is not None and ahead.pids:
        assert ahead.wait_ready()
    return chunk


def _workers_of(pid: int) -> list[int]:
    """Children of ``pid`` running the hashing worker."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as cmd:
                    if b"hashworker.py" in cmd.read():
                        found.append(int(child))
    return found


def _expected_workers() -> int:
    cores = len(os.sched_getaffinity(0))
    return 0 if cores < 2 else 4


def test_worker_count_follows_the_cores():
    assert _worker_count() == _expected_workers()


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_workers_serve_sequential_reads_and_die_with_the_image(tree, tmp_path, key):
    src, data = tree
    image, digest = _built(src, tmp_path, key)
    with _opened(image, digest, key) as (fs, fh):
        ahead = None
        for off in range(0, START - MiB, MiB):
            assert fs.read(fh, off, MiB) == data[off : off + MiB], off
            ahead = fs.reader.read_ahead
            assert ahead.pids == []  # a stream shorter than START_BLOCKS: verified in place
        # The read that completes START_BLOCKS starts them and does not wait for them.
        assert fs.read(fh, START - MiB, MiB) == data[START - MiB : START]
        pids = ahead.pids
        assert len(pids) == _expected_workers()
        assert ahead.served_blocks == 0
        assert ahead.wait_ready()
        for off in range(START, SIZE, MiB):
            assert fs.read(fh, off, MiB) == data[off : off + MiB], off
        assert ahead.served_blocks >= (SIZE - START) // BLOCK_SIZE - 256  # but the last one
        assert sorted(_workers_of(os.getpid())) == sorted(pids)
        # Reading backwards or at random is answered in place, still right.
        for off in (20 * MiB, 3 * MiB + 5, 0):
            assert fs.read(fh, off, MiB) == data[off : off + MiB], off
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), "a worker outlived close() or was not reaped"


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
@pytest.mark.parametrize("bad_block", [4096, START_BLOCKS + 3, START_BLOCKS + 1535, 10240])
def test_a_flipped_block_hashed_by_a_worker_fails_exactly_its_read(tree, tmp_path, key, bad_block):
    src, data = tree
    image, digest = _built(src, tmp_path, key)
    _flip(image, digest, key, bad_block)
    with _opened(image, digest, key) as (fs, fh):
        for off in range(0, SIZE, MiB):
            touches = off // BLOCK_SIZE <= bad_block < (off + MiB) // BLOCK_SIZE
            if touches:
                with pytest.raises(IntegrityError) as raised:
                    fs.read(fh, off, MiB)
                where = f"/big.bin: data at offset {bad_block * BLOCK_SIZE} "
                assert where in str(raised.value)
            else:
                assert _read(fs, fh, off) == data[off : off + MiB], off
        assert len(fs.reader.read_ahead.pids) == _expected_workers()
        if bad_block >= START_BLOCKS:  # the workers hashed it and the server caught it
            assert fs.reader.read_ahead.served_blocks > 0


def test_jumps_between_sequential_runs_keep_the_workers_serving(tree, tmp_path, caplog):
    src, data = tree
    image, digest = _built(src, tmp_path)
    fs = open_image_fs(image, digest=digest, key=None)
    rng = random.Random(3)
    try:
        fh = fs.open(fs.lookup(1, b"big.bin").ino, os.O_RDONLY)
        for off in range(0, START, MiB):  # one long stream starts the workers
            assert _read(fs, fh, off) == data[off : off + MiB], off
        assert fs.reader.read_ahead.pids
        with caplog.at_level(logging.WARNING, logger="occlumfs.merkle"):
            for _ in range(40):
                start = rng.randrange(0, SIZE - 6 * MiB, BLOCK_SIZE * rng.choice([1, 256]))
                before = fs.reader.read_ahead.served_blocks
                for off in range(start, start + 6 * MiB, MiB):
                    assert fs.read(fh, off, MiB) == data[off : off + MiB], off
                # Once started, the workers serve every sequential run after its first
                # request: no slot was lost to a window left behind by a jump.
                assert fs.reader.read_ahead.served_blocks - before >= 5 * 256
        assert not caplog.records
        assert len(fs.reader.read_ahead.pids) == _expected_workers()
    finally:
        fs.close()


def test_a_bad_tree_block_is_the_images_fault_not_the_workers(tree, tmp_path, caplog):
    src, data = tree
    image, digest = _built(src, tmp_path)
    fs = open_image_fs(image, digest=digest, key=None)
    try:
        rec = fs.record(fs.lookup(1, b"big.bin").ino)
        ((_, first, _),) = list(fs.extents(rec))
        first += fs.reader.layout.data_start
        # The level-0 tree block holding the hash of file block START_BLOCKS + 1000 (128
        # hashes a block; hash k is of image block k + 1): every read of a block it
        # covers fails, also when a worker hashed that block.
        index = (first + START_BLOCKS + 1000 - 1) // 128
        tree_block = fs.reader.layout.tree_block(0, index)
        covered = range(index * 128 + 1 - first, (index + 1) * 128 + 1 - first)
    finally:
        fs.close()
    with open(image, "r+b") as f:
        f.seek(tree_block * BLOCK_SIZE + 5)
        byte = f.read(1)
        f.seek(tree_block * BLOCK_SIZE + 5)
        f.write(bytes([byte[0] ^ 1]))
    with _opened(image, digest, None) as (fs, fh):
        failed = []
        with caplog.at_level(logging.WARNING, logger="occlumfs.merkle"):
            for off in range(0, SIZE, MiB):
                try:
                    assert _read(fs, fh, off) == data[off : off + MiB], off
                except IntegrityError as exc:
                    assert "merkle tree level 0" in str(exc)
                    failed.append(off // MiB)
        assert failed == sorted({b * BLOCK_SIZE // MiB for b in covered})
        assert not caplog.records and not fs.reader.read_ahead.broken
        assert fs.reader.read_ahead.served_blocks > 0


def test_a_killed_worker_means_verifying_in_place(tree, tmp_path, caplog):
    src, data = tree
    image, digest = _built(src, tmp_path)
    with _opened(image, digest, None) as (fs, fh):
        for off in range(0, START, MiB):
            assert _read(fs, fh, off) == data[off : off + MiB]
        pids = fs.reader.read_ahead.pids
        assert pids  # started and up, and not asked for anything yet
        os.kill(pids[0], signal.SIGKILL)
        with caplog.at_level(logging.WARNING, logger="occlumfs.merkle"):
            for off in range(START, SIZE, MiB):
                assert fs.read(fh, off, MiB) == data[off : off + MiB], off
        assert fs.reader.read_ahead.broken
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "verifying on the request thread" in caplog.records[0].getMessage()
        assert fs.reader.read_ahead.pids == []  # the other one was stopped and reaped
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


def _read_through(path: Path, data: bytes) -> list[int]:
    """Read ``path`` in 1 MiB requests, checking every byte returned against ``data``;
    the offsets that failed with EIO (reading resumes at the next MiB)."""
    failed = []
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while True:
            try:
                chunk = os.pread(fd, MiB, off)
            except OSError as exc:
                assert exc.errno == errno.EIO
                failed.append(off)
                off = (off // MiB + 1) * MiB
                continue
            if not chunk:
                return failed
            assert chunk == data[off : off + len(chunk)], off
            off += len(chunk)
    finally:
        os.close(fd)


@pytest.mark.fuse
def test_a_mount_hashes_in_workers_catches_tampering_and_reaps_them(tree, tmp_path, mount):
    src, data = tree
    image, digest = _built(src, tmp_path)
    bad_block = START_BLOCKS + 1000
    _flip(image, digest, None, bad_block)
    log = tmp_path / "server.log"
    with mount(image, "--digest", digest, log_file=log, allow_log_errors=True) as mnt:
        server = int(mount_record(mnt)["pid"])
        failed = _read_through(mnt / "big.bin", data)
        workers = _workers_of(server)
        assert len(workers) == _expected_workers()
        assert (mnt / "small").read_bytes() == b"small file"
    for pid in workers:
        assert process_exited(pid), "a worker outlived the unmount"
    # The kernel may return the good bytes before the bad block first (a short
    # read); what fails is a read starting at most 1 MiB before it, and only that.
    assert failed and all(0 <= bad_block * BLOCK_SIZE - off < MiB for off in failed), failed
    text = log.read_text()
    assert f"/big.bin: data at offset {bad_block * BLOCK_SIZE} " in text
    assert "failed verification" in text and "Traceback" not in text
    assert "WARNING" not in text  # the workers did not fail


@pytest.mark.fuse
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_workers_end_with_their_server(tree, tmp_path, signum):
    src, data = tree
    image, digest = _built(src, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "server.log"
    run_cli("mount", image, mnt, "--digest", digest, "--log-file", log)
    try:
        server = int(mount_record(mnt)["pid"])
        with open(mnt / "big.bin", "rb") as f:
            assert f.read(START + 4 * MiB) == data[: START + 4 * MiB]
        workers = _workers_of(server)  # started, and kept while the image is served
        assert len(workers) == _expected_workers()
        os.kill(server, signum)
        assert wait_for_exit(server, 60)
        for pid in workers:  # SIGKILL: their pipes reach end of file and they leave
            assert wait_for_exit(pid, 60), f"worker {pid} outlived its server"
    finally:
        if mnt.resolve() in mounted_paths():
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    if signum == signal.SIGTERM:
        assert mnt.resolve() not in mounted_paths()
        text = log.read_text()
        assert "unmounted" in text and "WARNING" not in text and "Traceback" not in text


def test_workers_whose_pipes_are_past_descriptor_1024_still_serve(tree, tmp_path, caplog):
    """A server with many files open gets pipes numbered past select()'s limit."""
    src, data = tree
    image, digest = _built(src, tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.fail(f"the descriptor limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    null = os.open(os.devnull, os.O_RDONLY)
    held = [os.dup(null) for _ in range(1100)]
    try:
        with _opened(image, digest, None) as (fs, fh):
            with caplog.at_level(logging.WARNING, logger="occlumfs.merkle"):
                for off in range(0, SIZE, MiB):
                    assert _read(fs, fh, off) == data[off : off + MiB], off
            ahead = fs.reader.read_ahead
            assert min(ahead._answer, *ahead._pidfds) > 1024 and ahead.served_blocks > 0
            assert not caplog.records and not ahead.broken
    finally:
        for fd in [*held, null]:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _start_workers(fs, fh, data: bytes) -> None:
    """Read the first START bytes (which starts the workers) and wait until they are up."""
    for off in range(0, START, MiB):
        assert _read(fs, fh, off) == data[off : off + MiB], off
    assert fs.reader.read_ahead.pids


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_only_read_for_reply_lends_the_workers_memory(tree, tmp_path, key):
    """The FUSE adapter's read may get a view of a worker's slot (no copy); every
    other caller of read() gets bytes of its own, whoever served them."""
    src, data = tree
    image, digest = _built(src, tmp_path, key)
    with _opened(image, digest, key) as (fs, fh):
        _start_workers(fs, fh, data)
        ahead = fs.reader.read_ahead
        views = 0
        for off in range(START, SIZE, MiB):
            before = ahead.served_blocks
            lent = fs.read_for_reply(fh, off, MiB)
            assert lent == data[off : off + MiB], off
            views += isinstance(lent, memoryview)
            del lent
            own = fs.read(fh, off, MiB)  # the same bytes again (answered in place)
            assert type(own) is bytes and own == data[off : off + MiB], off
            assert ahead.served_blocks > before or off + MiB > SIZE
        # Whole 1 MiB requests inside one window come as views, unless opened
        # (an encrypted image's plaintext is always new bytes).
        assert views == (0 if key else (SIZE - START) // MiB)


def test_a_lent_request_across_a_hole_keeps_the_bytes_before_it(tmp_path):
    """A request spanning two extents reads the second after the first: the slot
    the first came from may go back to a worker meanwhile, so its bytes are kept."""
    src = tmp_path / "src"
    hole = START_BLOCKS + 256 + 100  # a zero block (a hole in the image) inside a request
    data = bytearray(big_file_tree(src, START + 4 * MiB, 7, {}))
    data[hole * BLOCK_SIZE : (hole + 1) * BLOCK_SIZE] = bytes(BLOCK_SIZE)
    (src / "big.bin").write_bytes(data)
    image, digest = _built(src, tmp_path)
    with _opened(image, digest, None) as (fs, fh):
        rec = fs.record(fs.lookup(1, b"big.bin").ino)
        assert [e[0] for e in fs.extents(rec)] == [0, hole + 1]
        _start_workers(fs, fh, data)
        ahead = fs.reader.read_ahead
        for off in range(START, len(data), MiB):
            before = ahead.served_blocks
            assert fs.read_for_reply(fh, off, MiB) == data[off : off + MiB], off
            assert ahead.served_blocks - before == 255 if off == START + MiB else 256


def test_workers_read_the_image_around_the_page_cache(tmp_path):
    """Windows hashed by the workers are read with O_DIRECT: the page cache does
    not keep a second copy of what the FUSE page cache will hold."""
    src = tmp_path / "src"
    size = START + 48 * MiB
    data = big_file_tree(src, size, 11, {})
    image, digest = _built(src, tmp_path)
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with _opened(image, digest, None) as (fs, fh):
            for off in range(0, size, MiB):
                assert _read(fs, fh, off) == data[off : off + MiB], off
            assert fs.reader.read_ahead.direct
            rec = fs.record(fs.lookup(1, b"big.bin").ino)
            ((_, first, _),) = list(fs.extents(rec))
            # Past what the kernel's read-ahead of the in-place part could reach.
            at = (fs.reader.layout.data_start + first) * BLOCK_SIZE + size - 4 * MiB
        with pytest.raises(BlockingIOError):
            os.preadv(fd, [bytearray(BLOCK_SIZE)], at, os.RWF_NOWAIT)
        assert os.pread(fd, BLOCK_SIZE, at) == data[size - 4 * MiB : size - 4 * MiB + BLOCK_SIZE]
    finally:
        os.close(fd)


def test_closing_the_image_while_a_lent_view_is_held(tree, tmp_path):
    src, data = tree
    image, digest = _built(src, tmp_path)
    fs = open_image_fs(image, digest=digest, key=None)
    fh = fs.open(fs.lookup(1, b"big.bin").ino, os.O_RDONLY)
    _start_workers(fs, fh, data)
    pids = fs.reader.read_ahead.pids
    lent = fs.read_for_reply(fh, START, MiB)
    assert isinstance(lent, memoryview)
    fs.close()  # the mapping outlives the image while the view does; no error
    assert lent == data[START : START + MiB]
    lent.release()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.timeout(120)
def test_windows_go_to_whichever_worker_is_free(tree, tmp_path, caplog):
    """Workers take windows from one queue: a worker that gets no CPU (here: stopped
    before it took any) delays nothing; the others serve the whole stream."""
    src, data = tree
    image, digest = _built(src, tmp_path)
    with _opened(image, digest, None) as (fs, fh):
        _start_workers(fs, fh, data)
        ahead = fs.reader.read_ahead
        stopped = ahead.pids[0]
        os.kill(stopped, signal.SIGSTOP)
        # Stopped for sure (a signal is delivered when the target next runs)
        # before anything is asked: it holds no window.
        os.waitid(os.P_PID, stopped, os.WSTOPPED | os.WNOWAIT)
        try:
            with caplog.at_level(logging.WARNING, logger="occlumfs.merkle"):
                for off in range(START, SIZE, MiB):
                    assert fs.read(fh, off, MiB) == data[off : off + MiB], off
            assert ahead.served_blocks >= (SIZE - START) // BLOCK_SIZE - 256
            assert not caplog.records and not ahead.broken
        finally:
            os.kill(stopped, signal.SIGCONT)
