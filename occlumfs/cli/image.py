"""Image-layer commands: mkimage, digest, verify, ls, cat, stat.

Each parses its arguments, calls :mod:`occlumfs.merkle` and prints. Offline
commands verify every block they read against the image's Merkle tree; a
failure is one line naming the path or region, with exit code 13.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click

from occlumfs.cli.quick import (
    check_source,
    check_stdout,
    host_error,
    quiet_broken_pipe,
    source_date_epoch,
)
from occlumfs.errors import (
    FSError,
    NotFoundError,
    OcclumfsError,
    UsageError,
)
from occlumfs.fs import Attr, iter_dir, lookup_path, read_all

KEY_FILE = click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Key file (from 'occlumfs keygen') of an encrypted image.",
)
DIGEST = click.option(
    "--digest", help="Digest to pin (sha256:...); refuse an image with any other digest."
)
IMAGE = click.argument("image", type=click.Path(path_type=Path, dir_okay=False))


def _one_line_errors(command):
    """Host and filesystem errors as one line (exit 1), never a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        check_stdout()
        try:
            return command(*args, **kwargs)
        except OcclumfsError:
            raise
        except BrokenPipeError:
            # The reader went away (`occlumfs cat ... | head`): stop quietly.
            sys.exit(quiet_broken_pipe())
        except OSError as exc:
            raise host_error(exc) from None

    return run


def _key(key_file: Path | None) -> bytes | None:
    if not key_file:
        return None
    from occlumfs.keys import load_key_file  # cryptography: only when a key is given

    return load_key_file(key_file)


@contextlib.contextmanager
def _progress(label: str, total: int | None) -> Iterator:
    """A progress callback drawing a bar on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty() or not total:
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


def _source_bytes(source: Path) -> int | None:
    if not source.is_dir():
        return None
    total = 0
    for dirpath, _dirs, files in os.walk(source):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
# As given, not as a Path: "out/" must stay distinguishable from "out".
@click.argument("image", type=click.Path(dir_okay=False))
@KEY_FILE
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Hashing processes (default: CPUs).")
@_one_line_errors
def mkimage(src: Path, image: str, key_file: Path | None, jobs: int | None) -> None:
    """Build IMAGE from SRC (a directory, .tar or .tar.gz); print its digest last.

    The same tree gives the same image bytes. File mtimes are kept, clamped to
    $SOURCE_DATE_EPOCH when it is set. With --key-file, contents, names and
    metadata are encrypted (still reproducible for the same key).
    """
    from occlumfs.merkle import build_image

    key = _key(key_file)
    epoch = source_date_epoch()
    check_source(src)
    total = _source_bytes(src) if sys.stderr.isatty() else None
    with _progress("hashing", total) as progress:
        digest = build_image(
            src, image, key=key, source_date_epoch=epoch, jobs=jobs, progress=progress
        )
    click.echo(digest)


@click.command()
@IMAGE
@_one_line_errors
def digest(image: Path) -> None:
    """Print the digest IMAGE's header carries; checks nothing else ('verify' does)."""
    from occlumfs.merkle import read_digest

    click.echo(read_digest(image))


@click.command()
@IMAGE
@DIGEST
@KEY_FILE
@_one_line_errors
def verify(image: Path, digest: str | None, key_file: Path | None) -> None:
    """Check every block and record of IMAGE; exit 13 naming the first bad path or region."""
    from occlumfs.merkle import verify_image

    key = _key(key_file)
    total = image.stat().st_size if image.exists() else None
    with _progress("verifying", total) as progress:
        verify_image(image, digest=digest, key=key, progress=progress)
    click.echo(f"{image}: OK")


def _open(image: Path, digest: str | None, key_file: Path | None):
    from occlumfs.merkle import open_image_fs

    if not image.exists():
        raise NotFoundError(f"{image} does not exist")
    return open_image_fs(image, digest=digest, key=_key(key_file))


def _lookup(fs, image: Path, path: str) -> Attr:
    try:
        return lookup_path(fs, path)
    except FSError as exc:
        if isinstance(exc, OcclumfsError):
            raise
        if exc.errno == errno.ENOENT:
            raise NotFoundError(f"{path}: no such file or directory in {image}") from None
        if exc.errno == errno.ENOTDIR:  # a file where the path needs a directory
            raise NotFoundError(f"{path}: not a directory in {image}") from None
        raise OcclumfsError(f"{path}: {exc.strerror} (in {image})") from None


def _out(line: bytes) -> None:
    sys.stdout.buffer.write(line + b"\n")


def _long(attr: Attr, name: bytes, fs) -> bytes:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(attr.mtime_ns // 1_000_000_000))
    size = (
        f"{os.major(attr.rdev)}, {os.minor(attr.rdev)}"
        if stat.S_ISCHR(attr.mode) or stat.S_ISBLK(attr.mode)
        else str(attr.size)
    )
    line = (
        f"{stat.filemode(attr.mode)} {attr.nlink:>3} {attr.uid:>5} {attr.gid:>5} {size:>12} {when} "
    ).encode() + name
    if attr.is_lnk:
        line += b" -> " + fs.readlink(attr.ino)
    return line


@click.command("ls")
@IMAGE
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True, help="Show mode, links, owner, size and mtime.")
@DIGEST
@KEY_FILE
@_one_line_errors
def ls_command(
    image: Path, path: str, long: bool, digest: str | None, key_file: Path | None
) -> None:
    """List directory PATH of IMAGE (default: the root; a file: itself), verified, unmounted."""
    fs = _open(image, digest, key_file)
    try:
        attr = _lookup(fs, image, path)
        if attr.is_dir:
            entries = ((e.name, e.attr) for e in iter_dir(fs, attr.ino))
        else:
            entries = iter([(os.fsencode(path.rstrip("/").rsplit("/", 1)[-1]), attr)])
        for name, a in entries:
            _out(_long(a, name, fs) if long else name)
    finally:
        fs.close()


@click.command()
@IMAGE
@click.argument("path")
@DIGEST
@KEY_FILE
@_one_line_errors
def cat(image: Path, path: str, digest: str | None, key_file: Path | None) -> None:
    """Write regular file PATH of IMAGE to stdout, verified, without mounting."""
    fs = _open(image, digest, key_file)
    try:
        attr = _lookup(fs, image, path)
        if not attr.is_reg:
            raise UsageError(f"{path}: not a regular file in {image}")
        out = sys.stdout.buffer
        for chunk in read_all(fs, attr.ino):
            out.write(chunk)
        out.flush()
    finally:
        fs.close()


@click.command("stat")
@IMAGE
@click.argument("path")
@DIGEST
@KEY_FILE
@_one_line_errors
def stat_command(image: Path, path: str, digest: str | None, key_file: Path | None) -> None:
    """Show the stored metadata of PATH in IMAGE: type, mode, owner, size, times, xattrs."""
    fs = _open(image, digest, key_file)
    try:
        attr = _lookup(fs, image, path)
        lines = [
            f"path: {path}",
            f"inode: {attr.ino}",
            f"mode: {stat.filemode(attr.mode)} ({attr.mode:o})",
            f"links: {attr.nlink}",
            f"uid: {attr.uid}",
            f"gid: {attr.gid}",
            f"size: {attr.size}",
            f"blocks: {attr.blocks}",
            f"mtime_ns: {attr.mtime_ns}",
        ]
        if stat.S_ISCHR(attr.mode) or stat.S_ISBLK(attr.mode):
            lines.append(f"rdev: {os.major(attr.rdev)},{os.minor(attr.rdev)}")
        for line in lines:
            _out(line.encode("utf-8", "surrogateescape"))
        if attr.is_lnk:
            _out(b"target: " + fs.readlink(attr.ino))
        for name in fs.listxattr(attr.ino):
            _out(b"xattr: " + name + b"=" + repr(fs.getxattr(attr.ino, name)).encode())
    finally:
        fs.close()


COMMANDS = [mkimage, digest, verify, ls_command, cat, stat_command]

__all__ = ["COMMANDS"]
