"""What the union remembers of the inodes it has shown, and of open handles."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class Node:
    """An inode the union has shown, and where it lives in the layers."""

    ino: int
    is_dir: bool
    parent: int  # union inode of the directory it was last seen in
    name: bytes | None  # None: a non-directory whose name was removed
    upper: int | None = None  # the upper inode, once the entry is in the upper
    # Non-directories: (layer, lower inode) shown or read from: a lower-only
    # entry, or the data of a metadata-only copy in the upper.
    lower: tuple[int, int] | None = None
    # Directories: the lower directories merged in, top first, and the path in
    # the lowers' namespace they were found at (what a rename redirects to).
    stack: tuple[tuple[int, int], ...] = ()
    lower_path: bytes = b""
    # A hard-linked lower file's copy, shared by all its names through the index.
    indexed: bool = False


@dataclass(slots=True, eq=False)
class FileHandle:
    node: Node
    layer: int  # -1: the upper
    fh: int


@dataclass(slots=True, eq=False)
class DirHandle:
    node: Node
    layer_fhs: dict[int, int] = field(default_factory=dict)  # layer (-1: upper) -> handle
    # The upper directory's names (-> whether each is a whiteout), and its
    # (mtime, ctime) when they were read.
    upper_names: dict[bytes, bool] = field(default_factory=dict)
    upper_stamp: tuple[int, int] | None = None
    # The names the lower phases of the listing show, and the node's lower stack
    # they were gathered over (see UnionFS.readdir).
    below: frozenset[bytes] | set[bytes] = frozenset()
    below_of: tuple[tuple[int, int], ...] | None = None
