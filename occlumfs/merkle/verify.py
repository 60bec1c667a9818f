"""Check every block of an image, then every record, naming the first bad path or region."""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from occlumfs.errors import IntegrityError
from occlumfs.fs import ROOT_INO
from occlumfs.merkle.blocks import ImageReader
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DIRENT_SIZE,
    HASH_SIZE,
    MalformedImageError,
    blocks_for,
)
from occlumfs.merkle.reader import ImageFS
from occlumfs.merkle.tree import first_mismatch, hash_blocks

CHUNK_BLOCKS = 256  # 1 MiB per hashing task


def verify_image(
    image: Path,
    *,
    digest: str | None = None,
    key: bytes | None = None,
    progress: Callable[[int], None] | None = None,
    jobs: int | None = None,
) -> None:
    reader = ImageReader(Path(image), digest=digest, key=key)
    fs = ImageFS(reader)
    try:
        level0 = _verify_tree(reader)
        if progress is not None:
            progress((1 + reader.layout.tree_blocks) * BLOCK_SIZE)
        bad = _first_bad_block(reader, level0, progress, jobs or os.cpu_count() or 1)
        if bad is not None:
            raise IntegrityError(f"{image}: {_describe_block(fs, bad)} failed verification")
        _walk(fs)
    finally:
        fs.close()


def _verify_tree(reader: ImageReader) -> bytes:
    """Check every tree block from the top down; return level 0, now trusted."""
    layout = reader.layout
    geometry = layout.tree
    expected = reader.desc.root_hash
    level_bytes = b""
    for level in reversed(range(geometry.levels)):
        count = geometry.counts[level]
        start = layout.tree_block(level, 0)
        level_bytes = os.pread(reader.fd, count * BLOCK_SIZE, start * BLOCK_SIZE)
        if len(level_bytes) != count * BLOCK_SIZE:
            raise IntegrityError(f"{reader.path}: merkle tree level {level} is truncated")
        got = hash_blocks(level_bytes)
        bad = first_mismatch(got, expected[: len(got)])
        if bad is not None:
            raise IntegrityError(
                f"{reader.path}: merkle tree level {level} block {bad} "
                f"(image offset {(start + bad) * BLOCK_SIZE}) failed verification"
            )
        expected = level_bytes
    return level_bytes


def _first_bad_block(reader: ImageReader, level0: bytes, progress, jobs: int) -> int | None:
    covered = reader.layout.covered_blocks
    chunks = range(1, covered + 1, CHUNK_BLOCKS)
    fd = reader.fd

    def check(first: int) -> int | None:
        n = min(CHUNK_BLOCKS, covered + 1 - first)
        buf = os.pread(fd, n * BLOCK_SIZE, first * BLOCK_SIZE)
        if len(buf) != n * BLOCK_SIZE:
            return first + len(buf) // BLOCK_SIZE
        want = level0[(first - 1) * HASH_SIZE : (first - 1 + n) * HASH_SIZE]
        bad = first_mismatch(hash_blocks(buf), want)
        return None if bad is None else first + bad

    with ThreadPoolExecutor(jobs, thread_name_prefix="verify") as pool:
        for first, bad in zip(chunks, pool.map(check, chunks), strict=True):
            if bad is not None:
                return bad
            if progress is not None:
                progress(min(CHUNK_BLOCKS, covered + 1 - first) * BLOCK_SIZE)
    return None


def _describe_block(fs: ImageFS, block_no: int) -> str:
    """Name the file holding data block ``block_no`` if the metadata can say, else the region."""
    layout = fs.reader.layout
    region = layout.region_of(block_no)
    where = f"{region} block {block_no} (image offset {block_no * BLOCK_SIZE})"
    if region != "data":
        return where
    rel = block_no - layout.data_start
    try:
        for path, _ino, rec in _iter_tree(fs):
            if not stat.S_ISREG(rec.mode):
                continue
            for first, data, count in fs.extents(rec):
                if data <= rel < data + count:
                    return f"{path} at offset {(first + rel - data) * BLOCK_SIZE} ({where})"
    except (IntegrityError, MalformedImageError):
        pass
    return where


def _iter_tree(fs: ImageFS):
    """(path, ino, record) of every inode reachable from the root, breadth first."""
    root = fs.record(ROOT_INO)
    if not stat.S_ISDIR(root.mode):
        raise MalformedImageError(f"{fs.reader.path}: the root is not a directory")
    yield "/", ROOT_INO, root
    pending = deque([(b"", ROOT_INO)])
    seen_dirs = {ROOT_INO}
    while pending:
        prefix, ino = pending.popleft()
        for entry in fs.readdir(ino, 0):
            path = prefix + b"/" + entry.name
            rec = fs.record(entry.attr.ino)
            yield os.fsdecode(path), entry.attr.ino, rec
            if entry.attr.is_dir:
                if entry.attr.ino in seen_dirs:
                    raise MalformedImageError(
                        f"{fs.reader.path}: directory cycle at {os.fsdecode(path)}"
                    )
                seen_dirs.add(entry.attr.ino)
                pending.append((path, entry.attr.ino))


def _walk(fs: ImageFS) -> None:
    """Decode every record: directories, symlinks, xattrs, extents; decrypt every data block."""
    reader = fs.reader
    checked_extents: set[int] = set()
    for path, ino, rec in _iter_tree(fs):
        if rec.xattr_count and not reader.desc.has_xattrs:
            raise MalformedImageError(f"{reader.path}: {path}: xattrs in an image flagged without")
        fs.listxattr(ino)
        kind = stat.S_IFMT(rec.mode)
        if kind == stat.S_IFDIR:
            reader.heap(rec.ref, rec.count * DIRENT_SIZE)
        elif kind == stat.S_IFLNK:
            fs.readlink(ino)
        elif kind == stat.S_IFREG and rec.count and rec.ref not in checked_extents:
            checked_extents.add(rec.ref)
            _check_extents(fs, path, ino, rec)


def _check_extents(fs: ImageFS, path: str, ino: int, rec) -> None:
    reader = fs.reader
    end = 0
    stored = 0
    for first, data, count in fs.extents(rec):
        if first < end or count == 0 or first + count > blocks_for(rec.size):
            raise MalformedImageError(
                f"{reader.path}: {path}: extents out of order or beyond the file"
            )
        if data + count > reader.desc.data_blocks:
            raise MalformedImageError(f"{reader.path}: {path}: extent beyond the data region")
        end = first + count
        stored += count
        if reader.keys is not None:
            fs.read_data(ino, reader.layout.data_start + data, first, count)
    if stored != rec.aux:
        raise MalformedImageError(
            f"{reader.path}: {path}: stored block count disagrees with extents"
        )
