"""Loading a SEFS: head -> root at open; pages -> records -> inodes when needed.

Every object is checked against the tag its parent recorded (docs/formats/sefs.md).
A mounted filesystem reads the head and the root at open and then each page
when an inode or entry in it is first needed (:func:`materialise`): tampering
is found when the damaged page is read. fsck loads everything at once
(:func:`load_all`), in tolerant mode: a page that fails and a record that does
not fit are collected as problems instead of refusing the filesystem.
"""

from __future__ import annotations

import functools
import stat
import struct
from operator import itemgetter

from occlumfs.errors import IntegrityError
from occlumfs.fs import ROOT_INO
from occlumfs.sefs import format as fmt
from occlumfs.sefs.inode import EMPTY, Inode, InodeTable
from occlumfs.sefs.keys import Keys
from occlumfs.sefs.pages import PageTable
from occlumfs.sefs.state import TrustedState

Problems = list[tuple[int | None, str]]  # (ino, what)
_ENTRY_KEY_END = b"\xff" * 256  # after every name (names are at most 255 bytes)
_MAP_KEY_END = b"\xff" * 9  # after every chunk number (8 bytes)
_U32 = struct.Struct(">I")  # an inode record starts with its mode
# An inode record without target or extended attributes (docs/formats/sefs.md):
# its fixed fields (format.InodeRecord's order, entry count last), then a
# target length and an attribute count, both 0.
_PLAIN_INODE = struct.Struct(">IIIIQQqqqQQQII")
# One with a target (a symlink's, or a small file's inline data: version 4) and
# no extended attributes: the fixed fields, the target's length, the target, 0.
_TARGET_INODE = struct.Struct(">IIIIQQqqqQQQI")
_NO_XATTRS = bytes(4)


def open_root(pages: PageTable, keys: Keys, state: TrustedState | None) -> int:
    """Check the head and the root, take the root's page table; returns the next inode."""
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
    # What each pack holds up to its last live object (its dead tail, if any, is
    # not counted): enough to tell when a compaction is due, without a stat each.
    for ref in [*root.pages, head.root]:
        end = ref.offset + ref.length
        if pages.pack_sizes.get(ref.pack, 0) < end:
            pages.pack_sizes[ref.pack] = end
    return root.next_ino


def _inode_from(ino: int, value: bytes) -> tuple[Inode, int]:
    """The inode of record ``value``, and its directory entry count on record."""
    size = len(value)
    if size == _PLAIN_INODE.size:  # most are: unpacked at once
        fields = _PLAIN_INODE.unpack(value)
        if not fields[12] and not fields[13]:
            return Inode.recorded(ino, fields[:11]), fields[11]
    elif size > _PLAIN_INODE.size:
        fields = _TARGET_INODE.unpack_from(value)
        at = _TARGET_INODE.size
        if size == at + fields[12] + 4 and value.endswith(_NO_XATTRS):
            return Inode.recorded(ino, fields[:11], value[at : size - 4]), fields[11]
    rec = fmt.parse_inode(value)
    fields = (rec.mode, rec.nlink, rec.uid, rec.gid, rec.rdev, rec.size)
    times = (rec.atime_ns, rec.mtime_ns, rec.ctime_ns, rec.parent, rec.next_cookie)
    return Inode.recorded(ino, fields + times, rec.target, rec.xattrs), rec.entry_count


def _add_chunk(node: Inode | None, chunk_no: int, value: bytes) -> bool:
    """Attach a block map chunk to ``node``; False when it cannot be its."""
    if node is None or not stat.S_ISREG(node.mode) or len(value) % fmt.ENTRY_SIZE:
        return False
    chunk = bytearray(value)
    if node.chunks is EMPTY:
        node.chunks = {}
    node.chunks[chunk_no] = chunk
    slots = chunk[:: fmt.ENTRY_SIZE]  # each entry's first byte: its slot (0: a hole)
    node.present += len(slots) - slots.count(0)
    return True


def _entries_lost(count: int, expected: int) -> str | None:
    if count == expected:
        return None
    return f"directory lists {count} of its {expected} entries"


def _read_entries(pages: PageTable, ino: int, expected: int) -> dict[bytes, tuple[int, int]]:
    """Directory ``ino``'s entries as committed, in cookie order."""
    prefix = fmt.entry_key(ino, b"")
    found = []
    for key, raw in pages.scan(prefix, prefix + _ENTRY_KEY_END):
        child, cookie = fmt.parse_entry(raw)
        found.append((cookie, key[len(prefix) :], child))
    lost = _entries_lost(len(found), expected)
    if lost is not None:
        raise IntegrityError(f"metadata inconsistent: inode {ino}: {lost}")
    found.sort(key=itemgetter(0))
    return {name: (child, cookie) for cookie, name, child in found}


def materialise_many(pages: PageTable, inos: list[int]) -> dict[int, Inode]:
    """Inodes ``inos`` (sorted, distinct) as committed, as :func:`materialise`
    reads each, in one pass over their pages; those without a record are left out."""
    found: dict[int, Inode] = {}
    ranges = [(key, key + b"\0") for key in map(fmt.inode_key, inos)]  # the key alone
    regular = []
    for n, _, value in pages.scan_many(ranges):
        ino = inos[n]
        node = found[ino] = _built(pages, ino, value)
        if stat.S_ISREG(node.mode) and not node.target:  # inline data: no block map
            regular.append(node)
    lows = [fmt.map_key(node.ino, 0) for node in regular]
    ranges = [(low, low[:9] + _MAP_KEY_END) for low in lows]
    for n, key, raw in pages.scan_many(ranges):
        _chunk_of(regular[n], key, raw)
    return found


def _built(pages: PageTable, ino: int, value: bytes) -> Inode:
    """The inode of record ``value``; a directory reads its entries when first used."""
    node, expected = _inode_from(ino, value)
    if node.is_dir:
        node.entries = functools.partial(_read_entries, pages, ino, expected)
    return node


def _chunk_of(node: Inode, key: bytes, raw: bytes) -> None:
    chunk_no = int.from_bytes(key[9:], "big")
    if len(key) != 17 or not _add_chunk(node, chunk_no, raw):
        raise IntegrityError(
            f"metadata inconsistent: inode {node.ino}: block map chunk {chunk_no} is malformed"
        )


def materialise(pages: PageTable, ino: int) -> Inode | None:
    """Inode ``ino`` as committed, read from its pages; None when it has no record.

    A directory's entries are read when first used (in cookie order), a regular
    file comes with its whole block map (one with inline data has none). Records
    that contradict each other are an integrity error, as a page that fails its
    check is.
    """
    value = pages.get(fmt.inode_key(ino))
    if value is None:
        return None
    node = _built(pages, ino, value)
    if stat.S_ISREG(node.mode) and not node.target:  # inline data: no block map
        low = fmt.map_key(ino, 0)
        for key, raw in pages.scan(low, low[:9] + _MAP_KEY_END):
            _chunk_of(node, key, raw)
    return node


def load_all(
    pages: PageTable,
    inodes: InodeTable,
    keys: Keys,
    *,
    state: TrustedState | None,
    tolerant: bool,
    problems: Problems,
) -> int:
    """Fill ``inodes`` with every inode, page by page; returns the next inode number.

    Entry records sort before inode records, which sort before map records, so
    a directory's entries wait (by parent) for its inode and a map chunk finds
    its inode already built.
    """

    def problem(ino: int | None, what: str) -> None:
        if not tolerant:
            raise IntegrityError(f"metadata inconsistent: inode {ino}: {what}")
        problems.append((ino, what))

    next_ino = open_root(pages, keys, state)
    packs: dict[int, bytes] = {}
    waiting: dict[int, list[tuple[int, bytes, int]]] = {}  # parent -> (cookie, name, child)
    expected_entries: dict[int, int] = {}  # directory -> entry count on record
    fs_id, starts = keys.fs_id, pages.starts
    for page, ref in enumerate(pages.table):
        what = f"metadata page {page}"
        try:
            plain = pages.open_object(packs, ref, fmt.page_ad(fs_id, ref.pack, starts[page]), what)
            records = pages.page_records(page, plain)
        except IntegrityError as exc:
            if not tolerant:
                raise
            problems.append((None, str(exc)))
            continue
        for key, value in records:
            kind, ino, rest = fmt.split_key(key)
            if kind == b"e":
                child, cookie = fmt.parse_entry(value)
                waiting.setdefault(ino, []).append((cookie, rest, child))
            elif kind == b"i":
                node, count = _inode_from(ino, value)
                inodes[ino] = node
                if node.is_dir:
                    expected_entries[ino] = count
            elif kind == b"m" and len(rest) == 8:
                chunk_no = int.from_bytes(rest, "big")
                if not _add_chunk(inodes.peek(ino), chunk_no, value):
                    problem(ino, f"block map chunk {chunk_no} of a missing or non-regular file")
            else:
                raise IntegrityError(f"{what}: unknown record kind")
    del packs
    for parent, found in waiting.items():
        pnode = inodes.peek(parent)
        if pnode is None or not pnode.is_dir:
            for _, name, _ in found:
                problem(parent, f"entry {name!r} in a missing directory")
            continue
        found.sort(key=itemgetter(0))  # stable: ties keep key order
        pnode.entries = {name: (child, cookie) for cookie, name, child in found}
    if inodes.peek(ROOT_INO) is None:
        raise IntegrityError("metadata: the root directory is missing")
    for ino, node in inodes.items():
        if node.is_dir:
            lost = _entries_lost(len(node.entries), expected_entries.get(ino, 0))
            if lost is not None:
                problem(ino, lost)
    return next_ino


def apply_inode(node: Inode, rec: fmt.InodeRecord) -> None:
    """Give ``node`` the fields its record states: for the loader and the log's replay."""
    node.mode, node.uid, node.gid = rec.mode, rec.uid, rec.gid
    node.nlink, node.rdev, node.size = rec.nlink, rec.rdev, rec.size
    node.atime_ns, node.mtime_ns, node.ctime_ns = rec.atime_ns, rec.mtime_ns, rec.ctime_ns
    node.parent, node.next_cookie = rec.parent, rec.next_cookie
    node.target, node.xattrs = rec.target, rec.xattrs or EMPTY


def remove_leftovers(pages: PageTable, inodes: InodeTable, next_ino: int) -> None:
    """Delete what a crash or an interrupted cleanup left: nothing references it."""
    storage = pages.storage
    live_packs = pages.live_packs()
    for name in storage.listdir(fmt.META_DIR):
        number = fmt.parse_pack_name(name)
        if number is not None and number not in live_packs:
            storage.unlink(f"{fmt.META_DIR}/{name}")
            pages.pack_sizes.pop(number, None)
    regular = _regular_files(pages, inodes, next_ino)
    for name in storage.listdir(fmt.DATA_DIR):
        ino = fmt.parse_data_name(name)
        if ino is not None and not (ino < next_ino and regular[ino >> 3] >> (ino & 7) & 1):
            storage.unlink(f"{fmt.DATA_DIR}/{name}")
    if storage.exists(fmt.HEAD_TMP_NAME):
        storage.unlink(fmt.HEAD_TMP_NAME)


def _regular_files(pages: PageTable, inodes: InodeTable, next_ino: int) -> bytearray:
    """A bitmap of the regular files' inode numbers: from the inode records, read
    page by page (no inode is built), and the inodes in memory."""
    bits = bytearray(next_ino // 8 + 1)
    for key, value in pages.scan(b"i", b"j"):
        ino = int.from_bytes(key[1:], "big")
        if len(value) >= 4 and ino < next_ino and stat.S_ISREG(_U32.unpack_from(value)[0]):
            bits[ino >> 3] |= 1 << (ino & 7)
    for ino, node in inodes.items():
        if ino < next_ino and stat.S_ISREG(node.mode):
            bits[ino >> 3] |= 1 << (ino & 7)
    return bits
