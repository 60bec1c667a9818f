"""UnionFS: ordered read-only lower layers under one writable upper, as one filesystem.

Every layer is a contract object (:class:`occlumfs.fs.Filesystem`). The union
keeps a table of the inodes it has shown (:class:`Node`): where each lives in
the upper, which lower entry it shows or reads its data from, and, for a
directory, which lower directories merge into it. The rules (docs/unionfs.md):

* lookup goes top-down: the upper, then the lowers top first; a whiteout ends
  the search, an opaque directory ends the merging;
* an entry never moves down: changes go to the upper after a copy-up
  (:mod:`occlumfs.unionfs.copyup`), deletions of lower names leave whiteouts
  (:mod:`occlumfs.unionfs.changes`);
* inode numbers are stable: a lower entry's derives from (layer, lower inode),
  and a copy keeps its origin's number in a private xattr.

This module holds the node table and the read side.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence

from occlumfs.errors import FSError, IntegrityError
from occlumfs.fs import ROOT_INO, Attr, DirEntry, Filesystem, FsInfo, StatFs
from occlumfs.unionfs import layers as L
from occlumfs.unionfs.changes import UnionChanges
from occlumfs.unionfs.copyup import CopyUp
from occlumfs.unionfs.nodes import DirHandle, FileHandle, Node


def _show(attr: Attr, ino: int, nlink: int, blocks: int) -> Attr:
    """A layer's ``attr`` rewritten as the union shows it. The layer handed it
    over for good (see :class:`occlumfs.fs.Attr`): no copy is made."""
    attr.ino = ino
    attr.nlink = nlink
    attr.blocks = blocks
    return attr


class UnionFS(UnionChanges, CopyUp, Filesystem):
    """Read-only ``lowers`` (bottom first) under a writable ``upper``."""

    def __init__(
        self,
        lowers: Sequence[Filesystem],
        upper: Filesystem,
        *,
        digests: Sequence[str] | None = None,
        name: str = "union",
        read_only: bool = False,
    ) -> None:
        if not lowers:
            raise ValueError("a union needs at least one lower layer")
        if len(lowers) >= L.MAX_LAYERS:
            raise ValueError(f"a union takes at most {L.MAX_LAYERS - 1} lower layers")
        self.lowers = list(lowers)
        self.upper = upper
        if digests is None:
            # An image layer knows its digest; any other lower must be named.
            digests = [getattr(lower, "digest", None) for lower in lowers]
            if None in digests:
                raise ValueError("a lower without a digest: pass digests=")
        self.digests = list(digests)
        self._layer_of_digest = {d: i for i, d in enumerate(self.digests)}
        self.read_only = read_only or upper.info.read_only
        # Lower data is best read in the runs its layers ask for.
        readahead = max((lower.info.readahead_kb or 0 for lower in self.lowers), default=0)
        # Nothing changes behind the kernel's back: the lowers are immutable and
        # the upper's store is locked to this union. What the kernel caches of
        # names and attributes stays true as long as the lowers say theirs does.
        timeout = upper.info.cache_timeout
        if all(lower.info.immutable for lower in self.lowers):
            timeout = max(timeout, min(lower.info.cache_timeout for lower in self.lowers))
        self.info = FsInfo(
            name=name,
            subtype="occlumfs-union",
            read_only=self.read_only,
            # Only this union changes it when each layer changes only through it.
            exclusive=upper.info.exclusive
            and all(lower.info.immutable or lower.info.exclusive for lower in self.lowers),
            cache_timeout=timeout,
            readahead_kb=readahead or None,
        )
        self._handles: dict[int, FileHandle | DirHandle] = {}
        # The kernel's references to each inode shown (lookups, listed entries,
        # new entries) and the open file handles on it: a non-directory with
        # neither is dropped from the node table (see forget).
        self._lookups: dict[int, int] = {}
        self._opens: dict[int, int] = {}
        self._next_fh = 1
        self._tmp_counter = 0
        root = Node(ROOT_INO, True, ROOT_INO, b"", upper=ROOT_INO)
        root.stack = self._merge_below([(i, ROOT_INO) for i in reversed(range(len(lowers)))])
        self._nodes: dict[int, Node] = {ROOT_INO: root}
        self._bind_lowers()

    # -- lifecycle ----------------------------------------------------------------------
    def kernel_keeps_file_times(self) -> None:
        # Every regular file the kernel writes lives in the upper (after a copy-up).
        self.upper.kernel_keeps_file_times()

    def started_serving(self) -> None:
        self.upper.started_serving()
        for lower in self.lowers:
            lower.started_serving()

    def close(self) -> None:
        try:
            self.upper.close()
        finally:
            for lower in self.lowers:
                lower.close()

    # -- resolving names ----------------------------------------------------------------
    def _node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise FSError(errno.ENOENT)
        return node

    def _dir_node(self, ino: int) -> Node:
        node = self._node(ino)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        return node

    def _lower_lookup(self, layer: int, parent: int, name: bytes) -> Attr | None:
        try:
            return self.lowers[layer].lookup(parent, name)
        except FSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    def _upper_lookup(self, parent: int | None, name: bytes) -> Attr | None:
        if parent is None:
            return None
        try:
            return self.upper.lookup(parent, name)
        except FSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def _is_opaque(self, fs: Filesystem, ino: int) -> bool:
        try:
            return fs.getxattr(ino, L.OPAQUE_XATTR) == b"y"
        except FSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOSYS):
                return False
            raise

    def _merge_below(self, dirs: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
        """``dirs`` (top first) up to and including the first opaque one."""
        for n, (layer, ino) in enumerate(dirs):
            if self._is_opaque(self.lowers[layer], ino):
                return tuple(dirs[: n + 1])
        return tuple(dirs)

    def _lower_child(
        self, stack: Sequence[tuple[int, int]], name: bytes
    ) -> tuple[list[tuple[int, Attr]], bool]:
        """What the lowers in ``stack`` show at ``name``: the entries, top first
        (a non-directory alone, or the directories merged), and whether a whiteout
        or a non-directory hides anything found further down."""
        found: list[tuple[int, Attr]] = []
        for layer, parent in stack:
            attr = self._lower_lookup(layer, parent, name)
            if attr is None:
                continue
            if L.is_whiteout(attr):
                return found, True
            if found and not attr.is_dir:
                return found, True
            found.append((layer, attr))
            if not attr.is_dir or self._is_opaque(self.lowers[layer], attr.ino):
                return found, True
        return found, False

    def _lower_stack_at(self, path: bytes) -> tuple[tuple[int, int], ...]:
        """The lower directories merged at absolute lower ``path`` (a redirect)."""
        stack = self._nodes[ROOT_INO].stack
        for part in path.split(b"/"):
            if not part:
                continue
            found, _ = self._lower_child(stack, part)
            if not found or not found[0][1].is_dir:
                return ()
            stack = tuple((layer, attr.ino) for layer, attr in found)
        return stack

    def _private_xattrs(self, ino: int) -> dict[bytes, bytes]:
        names = [n for n in self.upper.listxattr(ino) if L.is_private_xattr(n)]
        return {n: self.upper.getxattr(ino, n) for n in names}

    def _resolve(self, pnode: Node, name: bytes) -> Node:
        """The entry ``name`` of directory ``pnode`` as the union shows it, remembered."""
        return self._resolve_shown(pnode, name)[0]

    def _shown(self, pnode: Node, name: bytes) -> Attr:
        """The attributes the union shows of entry ``name`` of ``pnode``, remembered."""
        node, attr = self._resolve_shown(pnode, name)
        return self._attr(node) if attr is None else attr

    def _resolve_shown(self, pnode: Node, name: bytes) -> tuple[Node, Attr | None]:
        """:meth:`_resolve`, and what :meth:`_attr` would show of the entry when the
        answers of the lookups say it (None otherwise): no layer is asked twice."""
        if pnode.ino == ROOT_INO and name == L.PRIVATE_DIR:
            raise FSError(errno.ENOENT)
        up = self._upper_lookup(pnode.upper, name)
        if up is not None:
            if L.is_whiteout(up):
                raise FSError(errno.ENOENT)
            node = self._remember(self._upper_node(pnode, name, up))
            return node, self._attr(node, up)
        found, _ = self._lower_child(pnode.stack, name)
        if not found:
            raise FSError(errno.ENAMETOOLONG if len(name) > 255 else errno.ENOENT)
        layer, top = found[0]
        node = Node(L.lower_ino(layer, top.ino), top.is_dir, pnode.ino, name)
        if top.is_dir:
            node.stack = tuple((layer, attr.ino) for layer, attr in found)
            node.lower_path = pnode.lower_path + b"/" + name
            nlink = 1 if len(node.stack) > 1 else top.nlink
            return self._remember(node), _show(top, node.ino, nlink, top.blocks)
        node.lower = (layer, top.ino)
        copy = self._index_lookup(node.ino) if top.nlink > 1 else None
        if copy is not None:  # another name of it was copied up: show that copy
            self._apply_marks(node, copy.ino, self._private_xattrs(copy.ino), name)
            return self._remember(node), None
        return self._remember(node), _show(top, node.ino, top.nlink, top.blocks)

    def _upper_node(self, pnode: Node, name: bytes, up: Attr) -> Node:
        names = self.upper.listxattr(up.ino)
        marks = (
            {n: self.upper.getxattr(up.ino, n) for n in names if L.is_private_xattr(n)}
            if names
            else {}
        )
        origin = marks.get(L.ORIGIN_XATTR)
        ino = L.unpack_origin(origin) if origin is not None else up.ino
        node = Node(ino, up.is_dir, pnode.ino, name)
        if up.is_dir:
            node.upper = up.ino
            redirect = marks.get(L.REDIRECT_XATTR)
            if redirect is not None:
                node.lower_path = redirect
                node.stack = self._lower_stack_at(redirect)
            else:
                node.lower_path = pnode.lower_path + b"/" + name
                if marks.get(L.OPAQUE_XATTR) != b"y":
                    found, _ = self._lower_child(pnode.stack, name)
                    if found and found[0][1].is_dir:
                        node.stack = tuple((layer, attr.ino) for layer, attr in found)
        else:
            self._apply_marks(node, up.ino, marks, name)
        return node

    def _apply_marks(self, node: Node, upper_ino: int, marks: dict, name: bytes) -> None:
        """Make ``node`` the upper non-directory ``upper_ino`` carrying private ``marks``."""
        node.upper = upper_ino
        node.indexed = L.GONE_XATTR in marks
        node.lower = None
        meta = marks.get(L.METACOPY_XATTR)
        if meta is not None:
            digest, lino = L.unpack_metacopy(meta)
            layer = self._layer_of_digest.get(digest)
            if layer is None:
                raise IntegrityError(
                    f"union: {name!r} refers to data in lower {digest}, not mounted"
                )
            node.lower = (layer, lino)

    def _remember(self, fresh: Node) -> Node:
        node = self._nodes.get(fresh.ino)
        if node is None:
            self._nodes[fresh.ino] = fresh
            return fresh
        # Open handles hold the node: update it in place (field by field: a
        # loop over the slots costs 2 us, a fifth of a lookup).
        node.is_dir = fresh.is_dir
        node.parent = fresh.parent
        node.name = fresh.name
        node.upper = fresh.upper
        node.lower = fresh.lower
        node.stack = fresh.stack
        node.lower_path = fresh.lower_path
        node.indexed = fresh.indexed
        return node

    # -- read side ----------------------------------------------------------------------
    def _attr(self, node: Node, layer_attr: Attr | None = None) -> Attr:
        """What the union shows of ``node``; ``layer_attr``: the attributes of the
        inode it lives in, when the caller has just been given them."""
        if node.upper is None:
            layer, lino = node.lower if node.lower is not None else node.stack[0]
            attr = self.lowers[layer].getattr(lino) if layer_attr is None else layer_attr
            if node.is_dir and len(node.stack) > 1:
                return _show(attr, node.ino, 1, attr.blocks)
            return _show(attr, node.ino, attr.nlink, attr.blocks)
        attr = self.upper.getattr(node.upper) if layer_attr is None else layer_attr
        if node.is_dir:
            return _show(attr, node.ino, self._dir_nlink(node, attr), attr.blocks)
        nlink = self._indexed_nlink(node, attr) if node.indexed else attr.nlink
        blocks = attr.blocks
        if node.lower is not None:  # a metadata-only copy: the data is below
            layer, lino = node.lower
            blocks = self.lowers[layer].getattr(lino).blocks
        return _show(attr, node.ino, nlink, blocks)

    def _indexed_nlink(self, node: Node, attr: Attr) -> int:
        # The lower names still showing it, plus its upper names but the index's.
        layer, lino = L.split_lower_ino(node.ino)
        gone = int(self.upper.getxattr(node.upper, L.GONE_XATTR))
        return self.lowers[layer].getattr(lino).nlink - gone + attr.nlink - 1

    def _dir_nlink(self, node: Node, attr: Attr) -> int:
        # Counting a merged directory's subdirectories would take a listing:
        # like overlayfs, report 1 ("unknown", which find(1) understands).
        if node.stack:
            return 1
        if node.ino == ROOT_INO and self._upper_lookup(ROOT_INO, L.PRIVATE_DIR) is not None:
            return attr.nlink - 1
        return attr.nlink

    def lookup(self, parent: int, name: bytes) -> Attr:
        pnode = self._dir_node(parent)
        if name == b".":
            return self._counted(self._attr(pnode))
        if name == b"..":
            return self._counted(self._attr(self._node(pnode.parent)))
        return self._counted(self._shown(pnode, name))

    def _counted(self, attr: Attr) -> Attr:
        """``attr`` as an entry handed out: the kernel holds one more reference to it.

        An entry listed but not taken (the kernel's buffer was full) is counted
        too: a count too high only keeps a node longer, one too low would drop
        a node the kernel still uses.
        """
        self._lookups[attr.ino] = self._lookups.get(attr.ino, 0) + 1
        return attr

    def forget(self, ino: int, nlookup: int) -> None:
        """Drop a non-directory the kernel no longer references and nobody has open.

        Nothing is lost: the next lookup resolves it again from the layers, as
        after a remount. Directories stay: their nodes hold the lower stacks
        and are the parents copy-ups walk up through.
        """
        left = self._lookups.get(ino, 0) - nlookup
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self._drop_if_unused(ino)

    def _drop_if_unused(self, ino: int) -> None:
        node = self._nodes.get(ino)
        unused = ino not in self._lookups and ino not in self._opens
        if node is not None and not node.is_dir and unused:
            del self._nodes[ino]

    def getattr(self, ino: int) -> Attr:
        return self._attr(self._node(ino))

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if node.upper is not None:
            return self.upper.readlink(node.upper)
        layer, lino = node.lower if node.lower is not None else node.stack[0]
        return self.lowers[layer].readlink(lino)

    def _new_handle(self, handle: FileHandle | DirHandle) -> int:
        if isinstance(handle, FileHandle):
            ino = handle.node.ino
            self._opens[ino] = self._opens.get(ino, 0) + 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _handle(self, fh: int, kind: type) -> FileHandle | DirHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, kind):
            raise FSError(errno.EBADF)
        return handle

    def opendir(self, ino: int) -> int:
        return self._new_handle(DirHandle(self._dir_node(ino)))

    def _layer_dir_fh(self, handle: DirHandle, layer: int, ino: int) -> int:
        fh = handle.layer_fhs.get(layer)
        if fh is None:
            fs = self.upper if layer < 0 else self.lowers[layer]
            fh = handle.layer_fhs[layer] = fs.opendir(ino)
        return fh

    def _listed_below(self, node: Node, name: bytes) -> bool:
        """Whether the lower phase of a listing shows ``name`` (see readdir)."""
        found, _ = self._lower_child(node.stack, name)
        return bool(found)

    def readdir(self, fh: int, offset: int) -> Iterator[DirEntry]:
        """Merged listing: each lower, top first, then the upper; see docs/unionfs.md.

        A name is listed in the phase of the topmost lower holding it (with the
        attributes the union shows, wherever the entry lives now), or in the
        upper's phase when no lower shows it. Each phase resumes from the
        layer's own cookie, so cookies survive additions and removals.
        """
        handle = self._handle(fh, DirHandle)
        node = handle.node
        phase, cookie = L.unpack_cookie(offset)
        n = len(self.lowers)
        is_root = node.ino == ROOT_INO
        stack = node.stack
        # Over one lower directory, an entry whose name the upper does not hold is
        # what that lower shows: no need to look it up in every layer again; one
        # the upper holds as a whiteout is not shown.
        in_upper = self._upper_names(handle) if len(stack) == 1 else None
        # The names the lower phases show, gathered when a call walks them all
        # (the lowers never change): the upper phase, in that call or a later one,
        # then needs no lookup below to skip them.
        below: set[bytes] | None = set() if offset == 0 and node.upper is not None else None
        for depth, (layer, ldir) in enumerate(stack):
            here = n - layer
            if here < phase:
                continue
            lfs = self.lowers[layer]
            above = stack[:depth]
            start = cookie if here == phase else 0
            for entry in lfs.readdir(self._layer_dir_fh(handle, layer, ldir), start):
                name = entry.name
                if L.is_whiteout(entry.attr) or (is_root and name == L.PRIVATE_DIR):
                    continue
                if above and any(self._lower_lookup(al, ad, name) is not None for al, ad in above):
                    continue
                if below is not None:
                    below.add(name)
                if in_upper is not None:
                    whiteout = in_upper.get(name)
                    if whiteout:
                        continue
                    if whiteout is None and (entry.attr.nlink == 1 or entry.attr.is_dir):
                        attr = self._counted(self._attr_alone(node, layer, name, entry.attr))
                        yield DirEntry(name, attr, L.pack_cookie(here, entry.next_offset))
                        continue
                try:
                    attr = self._counted(self._shown(node, name))
                except FSError as exc:
                    if exc.errno == errno.ENOENT:
                        continue
                    raise
                yield DirEntry(name, attr, L.pack_cookie(here, entry.next_offset))
        if node.upper is None:
            return
        if below is not None:
            handle.below, handle.below_of = below, stack
        elif handle.below_of == stack:
            below = handle.below
        if below is not None and len(stack) == 1 and self._nothing_new_above(handle, below):
            return
        last = n + 1
        start = cookie if phase == last else 0
        for entry in self.upper.readdir(self._layer_dir_fh(handle, -1, node.upper), start):
            name = entry.name
            if L.is_whiteout(entry.attr) or (is_root and name == L.PRIVATE_DIR):
                continue
            if stack and (name in below if below is not None else self._listed_below(node, name)):
                continue
            fresh = self._upper_node(node, name, entry.attr)
            attr = self._counted(self._attr(self._remember(fresh), entry.attr))
            yield DirEntry(name, attr, L.pack_cookie(last, entry.next_offset))

    def _nothing_new_above(self, handle: DirHandle, below: set[bytes] | frozenset) -> bool:
        """Whether the upper phase of a listing would show nothing: every name the
        upper holds is a whiteout, hidden, or one the lower phases show."""
        is_root = handle.node.ino == ROOT_INO
        for name, whiteout in self._upper_names(handle).items():
            if not (whiteout or name in below or (is_root and name == L.PRIVATE_DIR)):
                return False
        return True

    def _upper_names(self, handle: DirHandle) -> dict[bytes, bool]:
        """The names in the upper directory of a listing -> whether each is a whiteout."""
        upper = handle.node.upper
        if upper is None:
            return {}
        # A large listing takes many readdir calls: read the names again only
        # when the directory changed (any change moves its ctime).
        attr = self.upper.getattr(upper)
        stamp = (attr.mtime_ns, attr.ctime_ns)
        if handle.upper_stamp != stamp:
            fh = self._layer_dir_fh(handle, -1, upper)
            handle.upper_names = {e.name: L.is_whiteout(e.attr) for e in self.upper.readdir(fh, 0)}
            handle.upper_stamp = stamp
        return handle.upper_names

    def _attr_alone(self, pnode: Node, layer: int, name: bytes, attr: Attr) -> Attr:
        """What the union shows of entry ``attr`` of the one lower under ``pnode``
        (not hard-linked): :meth:`_resolve` without looking it up again."""
        node = Node(L.lower_ino(layer, attr.ino), attr.is_dir, pnode.ino, name)
        if attr.is_dir:
            node.stack = ((layer, attr.ino),)
            node.lower_path = pnode.lower_path + b"/" + name
        else:
            node.lower = (layer, attr.ino)
        self._remember(node)
        return _show(attr, node.ino, attr.nlink, attr.blocks)

    def releasedir(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, DirHandle):
            for layer, lfh in handle.layer_fhs.items():
                (self.upper if layer < 0 else self.lowers[layer]).releasedir(lfh)

    def open(self, ino: int, flags: int) -> int:
        node = self._node(ino)
        if node.is_dir:
            raise FSError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._writable()
            self.copy_up_data(node, limit=0 if flags & os.O_TRUNC else None)
            return self._new_handle(FileHandle(node, -1, self.upper.open(node.upper, flags)))
        return self._new_handle(self._read_handle(node, flags))

    def _read_handle(self, node: Node, flags: int) -> FileHandle:
        if node.lower is not None:
            layer, lino = node.lower
            return FileHandle(node, layer, self.lowers[layer].open(lino, flags & ~os.O_TRUNC))
        return FileHandle(node, -1, self.upper.open(node.upper, flags))

    def read(self, fh: int, offset: int, size: int) -> bytes:
        layer, layer_fh, size = self._read_source(fh, offset, size)
        return layer.read(layer_fh, offset, size)

    def read_for_reply(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        layer, layer_fh, size = self._read_source(fh, offset, size)
        return layer.read_for_reply(layer_fh, offset, size)

    def _read_source(self, fh: int, offset: int, size: int) -> tuple[Filesystem, int, int]:
        """The layer a read of handle ``fh`` goes to, its handle there, and the size to ask."""
        handle = self._handle(fh, FileHandle)
        if handle.layer >= 0 and handle.node.lower is None and handle.node.upper is not None:
            # Copied up since it was opened: read what the union shows now.
            self.lowers[handle.layer].release(handle.fh)
            fresh = self._read_handle(handle.node, os.O_RDONLY)
            handle.layer, handle.fh = fresh.layer, fresh.fh
        if handle.layer < 0:
            return self.upper, handle.fh, size
        if handle.node.upper is not None:
            # A metadata-only copy: its size is the upper's (a truncate that
            # was cut short by a crash must not show the lower's tail).
            size = max(0, min(size, self.upper.getattr(handle.node.upper).size - offset))
        return self.lowers[handle.layer], handle.fh, size

    def _file_fs(self, handle: FileHandle) -> Filesystem:
        return self.upper if handle.layer < 0 else self.lowers[handle.layer]

    def flush(self, fh: int) -> None:
        handle = self._handle(fh, FileHandle)
        self._file_fs(handle).flush(handle.fh)

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if not isinstance(handle, FileHandle):
            raise FSError(errno.EBADF)
        ino = handle.node.ino
        left = self._opens.pop(ino) - 1
        if left:
            self._opens[ino] = left
        else:
            self._drop_if_unused(ino)
        self._file_fs(handle).release(handle.fh)

    def statfs(self) -> StatFs:
        return self.upper.statfs()

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if L.is_private_xattr(name):
            raise FSError(errno.ENODATA)
        fs, lino = self._meta_source(self._node(ino))
        if not fs.info.has_xattrs:  # `ls -l` asks this of every file it lists
            raise FSError(errno.ENODATA)
        return fs.getxattr(lino, name)

    def listxattr(self, ino: int) -> list[bytes]:
        fs, lino = self._meta_source(self._node(ino))
        return [n for n in fs.listxattr(lino) if not L.is_private_xattr(n)]

    def _meta_source(self, node: Node) -> tuple[Filesystem, int]:
        """The layer and inode holding ``node``'s attributes and xattrs."""
        if node.upper is not None:
            return self.upper, node.upper
        layer, lino = node.lower if node.lower is not None else node.stack[0]
        return self.lowers[layer], lino
