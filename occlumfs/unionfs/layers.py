"""The union's conventions, as pure functions: marks, inode numbers, cookies, references.

Layers speak overlayfs' language through the filesystem contract (docs/unionfs.md):

* a *whiteout* is a character device with rdev 0/0: the name is deleted in
  every layer below;
* an *opaque* directory carries the xattr ``trusted.overlay.opaque = y``: the
  directories of the same name below it are not merged in.

The upper layer also carries the union's private xattrs (``trusted.occlumfs.*``):
where a copied-up entry came from, which lower data a metadata-only copy still
reads, where a renamed lower directory's contents live, and the digests of the
lowers the upper was made over. Users never see or set any of these names.
"""

from __future__ import annotations

import stat
import struct

from occlumfs.errors import FSError
from occlumfs.fs import Attr

OPAQUE_XATTR = b"trusted.overlay.opaque"
ORIGIN_XATTR = b"trusted.occlumfs.origin"  # the union inode number the entry keeps
METACOPY_XATTR = b"trusted.occlumfs.metacopy"  # "<lower digest> <lower ino>": data still below
REDIRECT_XATTR = b"trusted.occlumfs.redirect"  # lower path whose directories merge here
LOWERS_XATTR = b"trusted.occlumfs.lowers"  # on the upper root: lower digests, bottom first
# On the copy of a hard-linked lower file (kept in the index): how many of its
# lower names no longer show it (renamed to upper names or deleted).
GONE_XATTR = b"trusted.occlumfs.gone"
PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"trusted.occlumfs.")

# The upper root holds one directory of its own (hidden from users): "work"
# builds copy-ups under private names before they are renamed into place.
PRIVATE_DIR = b".occlumfs-union"
WORK_DIR = b"work"
# "index" holds the copy of each hard-linked lower file under its union inode
# number, so that every lower name of it shows the one copy.
INDEX_DIR = b"index"

# Union inode numbers: an entry made in the upper keeps its upper number; an
# entry from lower layer i (bottom first) gets (i + 1) << LAYER_SHIFT | lower ino.
LAYER_SHIFT = 48
_LOW_MASK = (1 << LAYER_SHIFT) - 1
MAX_LAYERS = 1 << 14  # keeps every number and every cookie below 2**63

# readdir cookies: (phase << COOKIE_SHIFT) | the layer's own cookie. Phases run
# 1..n over the lowers, top first, then n + 1 over the upper.
COOKIE_SHIFT = 48

_ORIGIN = struct.Struct(">Q")


def shown_as(attr: Attr, ino: int, nlink: int, blocks: int) -> Attr:
    """A layer's ``attr`` as the union shows it (a new value: layers' Attrs are
    never changed). Spelled out field by field: dataclasses.replace costs 6 us,
    a third of a union lookup."""
    return Attr(
        ino=ino,
        mode=attr.mode,
        nlink=nlink,
        uid=attr.uid,
        gid=attr.gid,
        size=attr.size,
        rdev=attr.rdev,
        blocks=blocks,
        atime_ns=attr.atime_ns,
        mtime_ns=attr.mtime_ns,
        ctime_ns=attr.ctime_ns,
        blksize=attr.blksize,
    )


def is_whiteout(attr: Attr) -> bool:
    return stat.S_ISCHR(attr.mode) and attr.rdev == 0


def is_private_xattr(name: bytes) -> bool:
    return name.startswith(PRIVATE_XATTR_PREFIXES)


def lower_ino(layer: int, ino: int) -> int:
    """The union inode number of inode ``ino`` of lower layer ``layer``."""
    if ino > _LOW_MASK:
        raise FSError(5, f"lower layer {layer}: inode number {ino} too large for a union")
    return (layer + 1) << LAYER_SHIFT | ino


def split_lower_ino(ino: int) -> tuple[int, int] | None:
    """(layer, lower inode) a union inode number derives from; None for an upper one."""
    layer = (ino >> LAYER_SHIFT) - 1
    return None if layer < 0 else (layer, ino & _LOW_MASK)


def index_name(ino: int) -> bytes:
    return b"%x" % ino


def pack_origin(ino: int) -> bytes:
    return _ORIGIN.pack(ino)


def unpack_origin(raw: bytes) -> int:
    if len(raw) != _ORIGIN.size:
        raise FSError(5, "union: malformed origin mark in the upper layer")
    return _ORIGIN.unpack(raw)[0]


def pack_metacopy(digest: str, ino: int) -> bytes:
    return f"{digest} {ino}".encode()


def unpack_metacopy(raw: bytes) -> tuple[str, int]:
    try:
        digest, ino = raw.decode().split(" ")
        return digest, int(ino)
    except ValueError:
        raise FSError(5, "union: malformed metacopy mark in the upper layer") from None


def pack_cookie(phase: int, cookie: int) -> int:
    if not 0 <= cookie < 1 << COOKIE_SHIFT:
        raise FSError(5, f"union: a layer's readdir cookie {cookie} is out of range")
    return phase << COOKIE_SHIFT | cookie


def unpack_cookie(offset: int) -> tuple[int, int]:
    """(phase, the layer's cookie) of a union cookie; (0, 0) starts the listing."""
    return offset >> COOKIE_SHIFT, offset & ((1 << COOKIE_SHIFT) - 1)


def pack_lowers(digests: list[str]) -> bytes:
    return "\n".join(digests).encode()


def unpack_lowers(raw: bytes) -> list[str]:
    return raw.decode(errors="replace").split("\n") if raw else []


def describe_lowers_difference(recorded: list[str], given: list[str]) -> str | None:
    """One phrase naming how ``given`` differs from ``recorded``; None when equal."""
    if recorded == given:
        return None
    if len(recorded) != len(given):
        return f"it was made over {len(recorded)} lower(s), {len(given)} given"
    for i, (was, now) in enumerate(zip(recorded, given, strict=True)):
        if was != now:
            return f"lower {i} (bottom first) is {now}, the upper was made over {was}"
    return None
