"""Loading a SEFS: head -> root -> pages -> records -> in-memory inodes.

Every object is checked against the tag its parent recorded (docs/formats/sefs.md).
In tolerant mode (fsck) a page that fails and a record that does not fit are
collected as problems instead of refusing the filesystem.
"""

from __future__ import annotations

import stat
from operator import itemgetter

from occlumfs.errors import IntegrityError
from occlumfs.fs import ROOT_INO
from occlumfs.sefs import format as fmt
from occlumfs.sefs.inode import EMPTY, Inode
from occlumfs.sefs.keys import Keys
from occlumfs.sefs.pages import PageTable
from occlumfs.sefs.state import TrustedState

Problems = list[tuple[int | None, str]]  # (ino, what)


def load(
    pages: PageTable,
    inodes: dict[int, Inode],
    keys: Keys,
    *,
    state: TrustedState | None,
    tolerant: bool,
    problems: Problems,
) -> int:
    """Fill ``pages`` and ``inodes`` from the committed root; returns the next inode number."""

    def problem(ino: int | None, what: str) -> None:
        if not tolerant:
            raise IntegrityError(f"metadata inconsistent: inode {ino}: {what}")
        problems.append((ino, what))

    storage, fs_id = pages.storage, keys.fs_id
    try:
        raw = storage.read(fmt.HEAD_NAME)
    except FileNotFoundError:
        raise IntegrityError("head: the commit record is missing") from None
    head = fmt.parse_head(raw, fs_id, keys.head_mac)
    if state is not None and not state.check(head.counter, head.root.tag):
        # Trust on first use: pin what this machine sees now, so that from here
        # on an older snapshot of the directory is refused.
        state.update(head.counter, head.root.tag)
    packs: dict[int, bytes] = {}
    root = fmt.parse_root(
        pages.open_object(packs, head.root, fmt.root_ad(fs_id, head.counter), "root")
    )
    pages.use_root(head.counter, head.root.tag, root)
    count = len(root.pages)
    starts = pages.starts
    inode_recs: list[tuple[int, bytes]] = []
    entry_recs: list[tuple[int, int, bytes, int]] = []  # (cookie, parent, name, child)
    map_recs: list[tuple[int, int, bytes]] = []
    for page, ref in enumerate(root.pages):
        what = f"metadata page {page}"
        try:
            plain = pages.open_object(packs, ref, fmt.page_ad(fs_id, ref.pack, starts[page]), what)
            records = fmt.parse_page(plain)
        except IntegrityError as exc:
            if not tolerant:
                raise
            problems.append((None, str(exc)))
            continue
        members = pages.members[page]
        # The page's range, [low, high): the same test as page_of(key) == page,
        # since parse_root checked that first keys strictly increase.
        low = starts[page]
        high = starts[page + 1] if page + 1 < count else None
        for key, value in records:
            if key < low or (high is not None and key >= high):
                raise IntegrityError(f"{what}: holds a record of another page")
            members.add(key)
            kind, ino, rest = fmt.split_key(key)
            if kind == b"i":
                inode_recs.append((ino, value))
            elif kind == b"e":
                child, cookie = fmt.parse_entry(value)
                entry_recs.append((cookie, ino, rest, child))
            elif kind == b"m" and len(rest) == 8:
                map_recs.append((ino, int.from_bytes(rest, "big"), value))
            else:
                raise IntegrityError(f"{what}: unknown record kind")
    del packs
    expected_entries: dict[int, int] = {}  # directory -> entry count on record
    for ino, value in inode_recs:
        rec = fmt.parse_inode(value)
        node = Inode(ino, rec.mode, rec.uid, rec.gid)
        apply_inode(node, rec)
        inodes[ino] = node
        if node.is_dir:
            expected_entries[ino] = rec.entry_count
    entry_recs.sort(key=itemgetter(0))  # stable: ties keep key order, as before
    for cookie, parent, name, child in entry_recs:
        pnode = inodes.get(parent)
        if pnode is None or not pnode.is_dir:
            problem(parent, f"entry {name!r} in a missing directory")
            continue
        pnode.entries[name] = (child, cookie)
    for ino, chunk_no, value in map_recs:
        node = inodes.get(ino)
        if node is None or not stat.S_ISREG(node.mode) or len(value) % fmt.ENTRY_SIZE:
            problem(ino, f"block map chunk {chunk_no} of a missing or non-regular file")
            continue
        chunk = bytearray(value)
        if node.chunks is EMPTY:
            node.chunks = {}
        node.chunks[chunk_no] = chunk
        node.present += sum(1 for i in range(0, len(chunk), fmt.ENTRY_SIZE) if chunk[i])
    if ROOT_INO not in inodes:
        raise IntegrityError("metadata: the root directory is missing")
    for node in inodes.values():
        if node.is_dir and len(node.entries) != expected_entries.get(node.ino, 0):
            problem(
                node.ino,
                f"directory lists {len(node.entries)} of its "
                f"{expected_entries.get(node.ino, 0)} entries",
            )
    return root.next_ino


def apply_inode(node: Inode, rec: fmt.InodeRecord) -> None:
    """Give ``node`` the fields its record states: for the loader and the log's replay."""
    node.mode, node.uid, node.gid = rec.mode, rec.uid, rec.gid
    node.nlink, node.rdev, node.size = rec.nlink, rec.rdev, rec.size
    node.atime_ns, node.mtime_ns, node.ctime_ns = rec.atime_ns, rec.mtime_ns, rec.ctime_ns
    node.parent, node.next_cookie = rec.parent, rec.next_cookie
    node.target, node.xattrs = rec.target, rec.xattrs or EMPTY


def remove_leftovers(pages: PageTable, inodes: dict[int, Inode]) -> None:
    """Delete what a crash or an interrupted cleanup left: nothing references it."""
    storage = pages.storage
    live_packs = pages.live_packs()
    for name in storage.listdir(fmt.META_DIR):
        number = fmt.parse_pack_name(name)
        if number is not None and number not in live_packs:
            storage.unlink(f"{fmt.META_DIR}/{name}")
            pages.pack_sizes.pop(number, None)
    for name in storage.listdir(fmt.DATA_DIR):
        ino = fmt.parse_data_name(name)
        node = inodes.get(ino) if ino is not None else None
        if ino is not None and (node is None or not stat.S_ISREG(node.mode)):
            storage.unlink(f"{fmt.DATA_DIR}/{name}")
    if storage.exists(fmt.HEAD_TMP_NAME):
        storage.unlink(fmt.HEAD_TMP_NAME)
