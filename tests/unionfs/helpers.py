"""The union under test: two image layers built from host trees, a SEFS upper.

The bottom layer holds one entry of every kind the rules distinguish; the top
layer overrides some, deletes some (whiteouts) and hides one directory's lower
contents (opaque). :class:`Stack` opens, closes and reopens the union over one
upper, as a user's mounts would over time.
"""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from occlumfs.errors import FSError
from occlumfs.fs import Caller, iter_dir, lookup_path, read_all
from occlumfs.keys import write_key_file
from occlumfs.merkle import build_image
from occlumfs.unionfs import Lower, UnionFS, open_union

ROOT = Caller()
BIG = 3 << 20


def _file(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def build_bottom(root: Path) -> None:
    _file(root / "low-only", b"bottom: low-only\n")
    _file(root / "both", b"bottom: both\n")
    _file(root / "merged/from-bottom", b"bottom: merged/from-bottom\n")
    _file(root / "merged/shared", b"bottom: merged/shared\n")
    (root / "merged/sub-bottom").mkdir()
    _file(root / "opaque/hidden", b"bottom: opaque/hidden\n")
    _file(root / "deleted-file", b"bottom: deleted-file\n")
    _file(root / "deleted-dir/inside", b"bottom: deleted-dir/inside\n")
    _file(root / "tree/a/b/deep", b"bottom: tree/a/b/deep\n")
    _file(root / "tree/top", b"bottom: tree/top\n")
    (root / "tree/a/empty").mkdir()
    # An owned, set-gid, xattr-carrying, old file: copy-up must keep all of it.
    meta = root / "meta"
    _file(meta, b"bottom: meta\n", 0o2751)
    os.chown(meta, 1234, 5678)
    os.setxattr(meta, "user.colour", b"blue")
    os.utime(meta, ns=(1_000_000_123, 2_000_000_456))
    # Sparse: a block of data at each end of 3 MiB of hole.
    with open(root / "sparse", "wb") as f:
        f.write(b"start")
        f.seek(BIG - 4)
        f.write(b"end!")
    _file(root / "big", os.urandom(BIG))
    os.symlink("low-only", root / "link")
    _file(root / "hl-a", b"bottom: hard-linked\n")
    os.link(root / "hl-a", root / "merged/hl-b")


def build_top(root: Path) -> None:
    _file(root / "both", b"top: both\n")
    _file(root / "merged/from-top", b"top: merged/from-top\n")
    _file(root / "merged/shared", b"top: merged/shared\n")
    (root / "opaque").mkdir()
    os.setxattr(root / "opaque", "trusted.overlay.opaque", b"y")
    _file(root / "opaque/shown", b"top: opaque/shown\n")
    _whiteout(root / "deleted-file")
    _whiteout(root / "deleted-dir")


@dataclass
class Layers:
    images: list[Path]
    digests: list[str]

    def lowers(self) -> list[Lower]:
        return [Lower(i, d) for i, d in zip(self.images, self.digests, strict=True)]


def build_layers(where: Path) -> Layers:
    images, digests = [], []
    for name, build in (("bottom", build_bottom), ("top", build_top)):
        tree = where / f"{name}-tree"
        tree.mkdir(parents=True)
        build(tree)
        images.append(where / f"{name}.img")
        digests.append(build_image(tree, images[-1]))
    return Layers(images, digests)


class Stack:
    """One upper over the layers: open it, close it, open it again."""

    def __init__(self, layers: Layers, where: Path) -> None:
        self.layers = layers
        self.upper = where / "upper"
        self.state = where / "state"
        self.key_file = where / "upper.key"
        self.key = write_key_file(self.key_file)
        self.fs: UnionFS | None = None

    def open(self, **kwargs) -> UnionFS:
        self.fs = open_union(
            self.layers.lowers(),
            self.upper,
            key=self.key,
            state_dir=self.state,
            create=True,
            **kwargs,
        )
        return self.fs

    def reopen(self) -> UnionFS:
        self.fs.close()
        return self.open()

    def lower_args(self) -> list[str]:
        """``occlumfs mount`` options naming the union's lowers."""
        args = ["--type", "union"]
        for image, digest in zip(self.layers.images, self.layers.digests, strict=True):
            args += ["--lower", str(image), "--digest", digest]
        return args

    def secret_args(self) -> list[str]:
        return ["--key-file", str(self.key_file), "--state-dir", str(self.state)]

    def upper_args(self) -> list[str]:
        return ["--upper", str(self.upper), *self.secret_args()]


def listing(fs, path: str = "") -> list[bytes]:
    return sorted(e.name for e in iter_dir(fs, lookup_path(fs, path).ino))


def read(fs, path: str) -> bytes:
    return b"".join(read_all(fs, lookup_path(fs, path).ino))


def exists(fs, path: str) -> bool:
    try:
        lookup_path(fs, path)
    except FSError:
        return False
    return True


def parent_and_name(fs, path: str) -> tuple[int, bytes]:
    head, _, name = path.rpartition("/")
    return lookup_path(fs, head).ino, name.encode()


def write(fs, path: str, data: bytes, offset: int = 0, flags: int = os.O_WRONLY) -> None:
    fh = fs.open(lookup_path(fs, path).ino, flags)
    try:
        fs.write(fh, offset, data)
    finally:
        fs.release(fh)


def create(fs, path: str, data: bytes) -> None:
    parent, name = parent_and_name(fs, path)
    fh, _ = fs.create(parent, name, 0o644, os.O_WRONLY, ROOT)
    try:
        fs.write(fh, 0, data)
    finally:
        fs.release(fh)


def rename(fs, old: str, new: str, flags: int = 0) -> None:
    fs.rename(*parent_and_name(fs, old), *parent_and_name(fs, new), flags)


def errno_of(call, *args) -> int | None:
    try:
        call(*args)
    except OSError as exc:
        return exc.errno
    return None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
_libc.renameat2.argtypes.append(ctypes.c_uint)
_AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old, new, flags: int) -> int:
    """0, or the errno renameat2(2) failed with."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) == 0:
        return 0
    return ctypes.get_errno()
