"""Read a source tree (a directory or a tar archive) into memory as metadata only.

File contents stay where they are: a :class:`Content` says where to read them
(the file itself, or a spool file for tar members). Names are bytes, so
non-UTF-8 names survive. Symlinks are recorded, never followed; tar members
with absolute paths, ``..`` components or paths through a symlink are refused.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib

from occlumfs.errors import FormatError, NotFoundError, OcclumfsError
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    OCI_OPAQUE_MARKER,
    OCI_WHITEOUT_PREFIX,
    OPAQUE_VALUE,
    OPAQUE_XATTR,
    SYMLINK_MAX,
    WHITEOUT_RDEV,
    XATTR_LIST_MAX,
    XATTR_NAME_MAX,
    XATTR_VALUE_MAX,
    ZERO_BLOCK,
    is_whiteout,
    name_problem,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


# Plain classes, not dataclasses: `occlumfs mkimage` starts faster without
# loading the dataclasses module (docs/performance.md, issue 11).
class Content:
    """Where a regular file's bytes are: ``size`` bytes of ``path`` from ``offset``.

    ``stamp`` (size, mtime, ctime) lets the builder notice a file that changed
    while it was being read.
    """

    __slots__ = ("offset", "path", "size", "stamp")

    def __init__(
        self, path: bytes, offset: int, size: int, stamp: tuple[int, int, int] | None = None
    ) -> None:
        self.path = path
        self.offset = offset
        self.size = size
        self.stamp = stamp

    def __repr__(self) -> str:
        return f"Content({self.path!r}, {self.offset}, {self.size}, {self.stamp})"


class SourceNode:
    """One inode of the source tree (a hard link is one node under several names)."""

    __slots__ = (
        "children",
        "content",
        "gid",
        "mode",
        "mtime_ns",
        "rdev",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(
        self,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int = 0,
        rdev: int = 0,
        xattrs: list[tuple[bytes, bytes]] | None = None,
        target: bytes = b"",  # symlinks
        content: Content | None = None,  # regular files
        children: dict[bytes, SourceNode] | None = None,  # directories
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.rdev = rdev
        self.xattrs = [] if xattrs is None else xattrs
        self.target = target
        self.content = content
        self.children = children

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def size(self) -> int:
        if self.content is not None:
            return self.content.size
        return len(self.target) if stat.S_ISLNK(self.mode) else 0


def _check_xattrs(xattrs: list[tuple[bytes, bytes]], where: str) -> list[tuple[bytes, bytes]]:
    total = 0
    for name, value in xattrs:
        if not name or len(name) > XATTR_NAME_MAX or len(value) > XATTR_VALUE_MAX:
            raise FormatError(f"{where}: xattr {name[:40]!r} is too large to store")
        if b"\0" in name:
            raise FormatError(f"{where}: xattr name {name[:40]!r} contains a NUL byte")
        total += len(name) + 1
    if total > XATTR_LIST_MAX:
        raise FormatError(f"{where}: too many xattrs")
    return sorted(xattrs)


def _read_xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    if not names:
        return []  # most files: nothing to read, check or sort
    out = []
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise
        out.append((os.fsencode(name), value))
    return _check_xattrs(out, os.fsdecode(path))


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _node_from_stat(path: bytes, st: os.stat_result) -> SourceNode:
    node = SourceNode(
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        xattrs=_read_xattrs(path),
    )
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFDIR:
        node.children = {}
    elif kind == stat.S_IFREG:
        node.content = Content(path, 0, st.st_size, _stamp(st))
    elif kind == stat.S_IFLNK:
        node.target = os.readlink(path)
        if len(node.target) > SYMLINK_MAX:
            raise FormatError(f"{os.fsdecode(path)}: symlink target too long")
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        node.rdev = st.st_rdev
    return node


Numbering = tuple  # (inodes in order, ino by node id, link count by node id)


def number_tree(
    root: SourceNode,
    expand: Callable[[bytes, SourceNode], Iterator[bytes]] | None = None,
    top: bytes = b"",
    on_file: Callable[[SourceNode], None] | None = None,
) -> Numbering:
    """Inodes in depth-first pre-order of byte-sorted names (root = 1; a hard link
    takes the number of its first occurrence): the inodes in order, and the ino and
    link count of each by node id.

    Depth first is the order `find`, `tar` and `cp -r` visit a tree, and file
    data is laid out in inode order, so such a walk reads the image front to back
    (the host's read-ahead then works for it). With ``expand(path, node)``, each
    directory (``top``/...) is read when the walk enters it and gives its names;
    ``on_file(node)``: each regular file when first met.
    """
    order = [root]
    ino_of = {id(root): 1}
    links = {id(root): 2}
    stack = [(root, top, expand(top, root) if expand else iter(sorted(root.children)))]
    while stack:
        node, path, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        child = node.children[name]
        key = id(child)
        is_dir = child.children is not None
        if is_dir:
            links[id(node)] += 1
        if key not in ino_of:
            ino_of[key] = len(order) + 1
            order.append(child)
            if is_dir:
                links[key] = 2
                sub = path + b"/" + name if expand else path
                stack.append(
                    (child, sub, expand(sub, child) if expand else iter(sorted(child.children)))
                )
            else:
                links[key] = 1
                if on_file is not None and child.content is not None:
                    on_file(child)
        elif not is_dir:
            links[key] += 1
        else:
            raise FormatError("a directory appears twice in the source tree")
    return order, ino_of, links


def scan_directory(
    root: Path | str, on_file: Callable[[SourceNode], None] | None = None
) -> tuple[SourceNode, Numbering]:
    """The tree under directory ``root`` (hard links become shared nodes) and its
    numbering (:func:`number_tree`).

    Each directory is read as the numbering walk enters it, so ``on_file(node)``
    is called for each regular file in inode order while the scan goes on (its
    hashing can start at once).
    """
    top = os.fsencode(os.path.abspath(root))
    st = os.stat(top)  # SRC itself may be a symlink the user named; nothing below is followed
    if not stat.S_ISDIR(st.st_mode):
        raise FormatError(f"{root}: not a directory")
    tree = _node_from_stat(top, st)
    by_inode: dict[tuple[int, int], SourceNode] = {}

    def expand(path: bytes, node: SourceNode) -> Iterator[bytes]:
        return _list_directory(path, node, by_inode)

    return tree, number_tree(tree, expand, top, on_file)


def _list_directory(path: bytes, node: SourceNode, by_inode: dict) -> Iterator[bytes]:
    """Read directory ``path`` into ``node.children``: its names in byte order."""
    with os.scandir(path) as it:
        entries = list(it)
    for entry in entries:
        name = entry.name
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            known = by_inode.get((st.st_dev, st.st_ino))
            if known is not None:
                node.children[name] = known
                continue
        child = _node_from_stat(path + b"/" + name, st)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            by_inode[(st.st_dev, st.st_ino)] = child
        node.children[name] = child
    return iter(sorted(node.children))


# -- tar ------------------------------------------------------------------------------


def _member_parts(name: str, what: str) -> list[bytes]:
    raw = os.fsencode(name)
    if raw.startswith(b"/"):
        raise FormatError(f"tar {what} {name!r} is an absolute path; refusing it")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise FormatError(f"tar {what} {name!r} contains '..'; refusing it")
    for part in parts:
        problem = name_problem(part)
        if problem is not None:
            raise FormatError(f"tar {what} {name!r}: a name {problem}; refusing it")
    return parts


def _pax_mtime_ns(member) -> int:
    from decimal import Decimal, InvalidOperation

    text = member.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except (InvalidOperation, ValueError, OverflowError):  # also NaN, infinities
            raise FormatError(f"tar member {member.name!r}: bad mtime {text!r}") from None
    return int(member.mtime) * 1_000_000_000


def _pax_xattrs(member) -> list[tuple[bytes, bytes]]:
    import base64

    out = []
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out.append(
                (os.fsencode(key[len("SCHILY.xattr.") :]), value.encode("utf-8", "surrogateescape"))
            )
        elif key.startswith("LIBARCHIVE.xattr."):
            try:
                decoded = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                raise FormatError(f"tar member {member.name!r}: bad xattr encoding") from None
            out.append((os.fsencode(key[len("LIBARCHIVE.xattr.") :]), decoded))
    return _check_xattrs(out, f"tar member {member.name!r}")


def _check_ranges(member) -> None:
    """Refuse numbers the image cannot store (pax headers allow any size)."""
    if not (0 <= member.uid < 1 << 32 and 0 <= member.gid < 1 << 32):
        raise FormatError(f"tar member {member.name!r}: owner out of range")
    if not -(1 << 63) <= _pax_mtime_ns(member) < 1 << 63:
        raise FormatError(f"tar member {member.name!r}: mtime out of range")
    devices_ok = 0 <= member.devmajor < 1 << 32 and 0 <= member.devminor < 1 << 32
    if (member.ischr() or member.isblk()) and not devices_ok:
        raise FormatError(f"tar member {member.name!r}: device number out of range")


def _implicit_dir() -> SourceNode:
    return SourceNode(mode=stat.S_IFDIR | 0o755, children={})


def _spool(src, spool, size: int) -> int:
    """Copy ``size`` bytes to the end of ``spool`` (block-aligned, zero blocks as holes)."""
    start = spool.seek(0, os.SEEK_END)
    start = -(-start // BLOCK_SIZE) * BLOCK_SIZE
    pos = start
    remaining = size
    while remaining:
        chunk = src.read(min(remaining, 1 << 20))
        if not chunk:
            raise FormatError("tar archive is truncated")
        for off in range(0, len(chunk), BLOCK_SIZE):
            piece = chunk[off : off + BLOCK_SIZE]
            if piece != ZERO_BLOCK[: len(piece)]:
                spool.seek(pos + off)
                spool.write(piece)
        pos += len(chunk)
        remaining -= len(chunk)
    spool.truncate(max(spool.seek(0, os.SEEK_END), pos))
    return start


def _is_whiteout_node(node: SourceNode | None) -> bool:
    return node is not None and is_whiteout(node.mode, node.rdev)


def _is_opaque(node: SourceNode) -> bool:
    return (OPAQUE_XATTR, OPAQUE_VALUE) in node.xattrs


def _mark_opaque(node: SourceNode) -> None:
    kept = [(n, v) for n, v in node.xattrs if n != OPAQUE_XATTR]
    node.xattrs = sorted([*kept, (OPAQUE_XATTR, OPAQUE_VALUE)])


def _add_oci_marker(parent: SourceNode, name: bytes, member) -> None:
    """An OCI layer's ``.wh.NAME`` (whiteout of NAME) or ``.wh..wh..opq`` (opaque parent).

    A whiteout hides NAME in the layers below only: an entry NAME of this same
    layer wins, whichever comes first in the archive. When that entry is a
    directory it becomes opaque (it replaces the lower NAME, not merges with
    it), as overlayfs makes a directory created over a whiteout.
    """
    if member.isdir():
        raise FormatError(f"tar member {member.name!r}: a whiteout cannot be a directory")
    if name == OCI_OPAQUE_MARKER:
        _mark_opaque(parent)
        return
    target = name[len(OCI_WHITEOUT_PREFIX) :]
    if target.startswith(OCI_WHITEOUT_PREFIX):
        raise FormatError(f"tar member {member.name!r}: unsupported whiteout metadata")
    problem = name_problem(target)
    if problem is not None:
        raise FormatError(f"tar member {member.name!r}: the name it whites out {problem}")
    _check_ranges(member)
    existing = parent.children.get(target)
    if existing is not None and existing.is_dir:
        _mark_opaque(existing)
        return
    if existing is not None and not _is_whiteout_node(existing):
        return
    parent.children[target] = SourceNode(
        mode=stat.S_IFCHR,  # no permission bits: a whiteout is never opened
        uid=member.uid,
        gid=member.gid,
        mtime_ns=_pax_mtime_ns(member),
        rdev=WHITEOUT_RDEV,
    )


def scan_tar(archive: Path, spool_path: Path) -> SourceNode:
    """The tree in tar ``archive``; regular files' bytes are copied to ``spool_path``."""
    import tarfile  # only tar sources pay for it

    tree = _implicit_dir()
    spool_name = os.fsencode(spool_path)
    try:
        raw = open(archive, "rb")  # noqa: SIM115 - closed with the archive below
    except FileNotFoundError:
        raise NotFoundError(f"{archive} does not exist") from None
    # A pipe (`... | occlumfs mkimage /dev/stdin IMAGE`) cannot seek: read it as
    # a stream, each member's bytes when the member comes (as they are used).
    seekable = raw.seekable()
    try:
        tf = tarfile.open(  # noqa: SIM115 - closed by the with below, after error mapping
            fileobj=raw,
            mode="r:*" if seekable else "r|*",
            encoding="utf-8",
            errors="surrogateescape",
        )
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raw.close()
        if not seekable:  # what was read of a pipe cannot be read again
            raise FormatError(f"{archive}: not a readable tar archive") from None
        raise _unreadable(archive, exc) from None
    with raw, tf, open(spool_path, "w+b") as spool:
        try:
            for member in tf:
                _add_member(tree, tf, member, spool, spool_name)
        except OcclumfsError:
            raise
        except OSError as exc:
            if exc.filename is not None:  # the spool or the disk, not the archive
                raise
            raise FormatError(f"{archive}: broken tar archive ({_one_line(exc)})") from None
        except Exception as exc:
            # The decompressors raise their own types (zlib.error, LZMAError,
            # EOFError...) for a damaged archive: all mean the same to the user.
            raise FormatError(f"{archive}: broken tar archive ({_one_line(exc)})") from None
    return tree


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def _unreadable(archive: Path, exc: BaseException) -> FormatError:
    """One line saying why ``archive`` does not open (tarfile lists every method it tried)."""
    try:
        with open(archive, "rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    if not head:
        return FormatError(f"{archive}: empty file, not a readable tar archive")
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            return FormatError(f"{archive}: damaged {kind} data, not a readable tar archive")
    return FormatError(f"{archive}: not a readable tar archive (nor gzip, bzip2 or xz)")


def _add_member(tree, tf, member, spool, spool_name) -> None:

    parts = _member_parts(member.name, "member")
    parent = tree
    for part in parts[:-1]:
        child = parent.children.get(part)
        if child is None or _is_whiteout_node(child):
            replaces_whiteout = child is not None
            child = parent.children[part] = _implicit_dir()
            if replaces_whiteout:
                _mark_opaque(child)
        elif not child.is_dir:
            raise FormatError(
                f"tar member {member.name!r} goes through {os.fsdecode(part)!r}, "
                "which is not a directory; refusing it"
            )
        parent = child
    if parts and parts[-1].startswith(OCI_WHITEOUT_PREFIX):
        _add_oci_marker(parent, parts[-1], member)
        return
    if member.islnk():
        target_parts = _member_parts(member.linkname, "hard link target")
        target = tree
        for part in target_parts:
            if target.children is None or part not in target.children:
                raise FormatError(
                    f"tar hard link {member.name!r} points to {member.linkname!r}, "
                    "which is not earlier in the archive"
                )
            target = target.children[part]
        if target.is_dir or not parts:
            raise FormatError(f"tar hard link {member.name!r} to a directory; refusing it")
        parent.children[parts[-1]] = target
        return
    perm = member.mode & 0o7777
    _check_ranges(member)
    node = SourceNode(
        mode=perm,
        uid=member.uid,
        gid=member.gid,
        mtime_ns=_pax_mtime_ns(member),
        xattrs=_pax_xattrs(member),
    )
    if member.isdir():
        node.mode |= stat.S_IFDIR
        existing = tree if not parts else parent.children.get(parts[-1])
        node.children = existing.children if existing is not None and existing.is_dir else {}
        if _is_whiteout_node(existing) or (existing is not None and _is_opaque(existing)):
            # Whited out or marked opaque earlier in the archive: it stays so.
            _mark_opaque(node)
        if not parts:  # the archive's own "./": attributes of the root
            tree.mode, tree.uid, tree.gid = node.mode, node.uid, node.gid
            tree.mtime_ns, tree.xattrs = node.mtime_ns, node.xattrs
            return
    elif member.isreg():
        node.mode |= stat.S_IFREG
        src = tf.extractfile(member)
        offset = _spool(src, spool, member.size)
        node.content = Content(spool_name, offset, member.size)
    elif member.issym():
        node.mode |= stat.S_IFLNK
        node.target = os.fsencode(member.linkname)
        if not node.target or len(node.target) > SYMLINK_MAX or b"\0" in node.target:
            raise FormatError(f"tar symlink {member.name!r}: empty, too long or NUL in target")
    elif member.ischr() or member.isblk():
        node.mode |= stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        node.rdev = os.makedev(member.devmajor, member.devminor)
    elif member.isfifo():
        node.mode |= stat.S_IFIFO
    else:
        raise FormatError(f"tar member {member.name!r} has an unsupported type")
    if not parts:
        raise FormatError(f"tar member {member.name!r} would replace the root directory")
    parent.children[parts[-1]] = node
