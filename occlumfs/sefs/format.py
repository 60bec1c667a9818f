"""SEFS byte layouts (docs/formats/sefs.md): pure packing, parsing and offset math, no I/O."""

from __future__ import annotations

import hmac
import itertools
import struct
from dataclasses import dataclass, field

from occlumfs.errors import FormatError, IntegrityError
from occlumfs.fs import BLOCK_SIZE

VERSION = 1
CHUNK_SHIFT = 8
# A file's ciphertext sits at its plaintext offsets in one host file, so a file
# may be as large as the host's: ext4's limit with 4 KiB blocks, the smallest of
# the usual hosts. Past it a write or truncate fails EFBIG, before anything is
# buffered that no host write could ever store.
MAX_FILE_SIZE = (1 << 44) - 4096
CHUNK_BLOCKS = 1 << CHUNK_SHIFT  # block-map entries per map record (1 MiB of data)
CHUNK_MASK = CHUNK_BLOCKS - 1  # block & CHUNK_MASK: the block's index in its chunk
NONCE_SIZE = 12
TAG_SIZE = 16
ENTRY_SIZE = 1 + NONCE_SIZE + TAG_SIZE  # slot (1) || nonce (12) || tag (16)
ENTRY_NONCE = 1  # where the nonce starts in a map entry
ENTRY_TAG = ENTRY_NONCE + NONCE_SIZE  # ...and where the tag starts
FS_ID_SIZE = 16
PAGE_MAX = 64 * 1024  # a page whose plaintext outgrows this is split
PAGE_SPLIT = 32 * 1024  # ...into pages of about this size

SLOT_HOLE, SLOT_A, SLOT_B = 0, 1, 2

HEAD_MAGIC = b"OSEFSHD1"
ROOT_MAGIC = b"OSEFSRT1"
DATA_AD_MAGIC = b"OSEFSDB1"
PAGE_AD_MAGIC = b"OSEFSPG1"
LOG_MAGIC = b"OSEFSLG1"
LOG_AD_MAGIC = b"OSEFSLE1"

CONFIG_NAME = "sefs.json"
HEAD_NAME = "head"
HEAD_TMP_NAME = "head.tmp"
LOCK_NAME = "lock"
LOG_NAME = "log"  # the write-ahead log (version 3)
LOG_TMP_NAME = "log.tmp"
META_DIR = "m"
DATA_DIR = "d"

_HEAD = struct.Struct(">8s16sQQQI16s")
HEAD_SIZE = _HEAD.size + 32
_TABLE_ENTRY = struct.Struct(">QQI16s")
_ROOT_HEAD = struct.Struct(">8sQI")
_INODE = struct.Struct(">IIIIQQqqqQQQ")
_U64 = struct.Struct(">Q")
_ENTRY_VALUE = struct.Struct(">QQ")
DATA_AD_BLOCK = struct.Struct(">QQ")  # (ino, block): a data block's AD after data_ad_prefix
_RECORD_HEAD = struct.Struct(">HI")
_LOG_HEAD = struct.Struct(">8s16sQ16s")  # magic, fs_id, base counter, base root tag
LOG_HEAD_SIZE = _LOG_HEAD.size
LOG_LEN = struct.Struct(">I")  # the length of the sealed entry that follows
_LOG_RECORD = struct.Struct(">HBI")  # key_len, present, value_len
_LOG_BLOCK = struct.Struct(">QQ")  # ino, block; then its map entry and its ciphertext
LOG_BLOCK_SIZE = _LOG_BLOCK.size + ENTRY_SIZE + BLOCK_SIZE


# -- host names ----------------------------------------------------------------
def pack_name(counter: int) -> str:
    return f"{META_DIR}/{counter:016x}.pack"


def parse_pack_name(name: str) -> int | None:
    stem, _dot, ext = name.partition(".")
    if ext != "pack" or len(stem) != 16:
        return None
    try:
        return int(stem, 16)
    except ValueError:
        return None


def data_name(ino: int, slot: int) -> str:
    return f"{DATA_DIR}/{ino:016x}" + (".b" if slot == SLOT_B else "")


def parse_data_name(name: str) -> int | None:
    stem = name[:-2] if name.endswith(".b") else name
    if len(stem) != 16:
        return None
    try:
        return int(stem, 16)
    except ValueError:
        return None


# -- associated data -------------------------------------------------------------
def data_ad_prefix(fs_id: bytes) -> bytes:
    return DATA_AD_MAGIC + fs_id


def data_ad(prefix: bytes, ino: int, block: int) -> bytes:
    """The associated data of ``ino``'s block ``block`` (hot loops inline it: DATA_AD_BLOCK)."""
    return prefix + DATA_AD_BLOCK.pack(ino, block)


def page_ad(fs_id: bytes, pack: int, first_key: bytes) -> bytes:
    return PAGE_AD_MAGIC + fs_id + _U64.pack(pack) + first_key


def root_ad(fs_id: bytes, counter: int) -> bytes:
    return ROOT_MAGIC + fs_id + _U64.pack(counter)


def log_ad(fs_id: bytes, counter: int, root_tag: bytes, seq: int, prev_tag: bytes) -> bytes:
    """A log entry's associated data: the head it follows, its place, the entry before it."""
    return LOG_AD_MAGIC + fs_id + _U64.pack(counter) + root_tag + _U64.pack(seq) + prev_tag


# -- offsets -------------------------------------------------------------------------
def blocks_for(size: int) -> int:
    """How many blocks hold ``size`` bytes."""
    return -(-size // BLOCK_SIZE)


def block_span(offset: int, size: int) -> tuple[int, int]:
    """First and last block touched by ``size > 0`` bytes at ``offset``."""
    return offset // BLOCK_SIZE, (offset + size - 1) // BLOCK_SIZE


def chunk_of(block: int) -> tuple[int, int]:
    """(map chunk number, byte offset of the block's entry in that chunk)."""
    return block >> CHUNK_SHIFT, (block & CHUNK_MASK) * ENTRY_SIZE


def trim_chunk(chunk: bytes | bytearray) -> bytes:
    """A map chunk without its trailing holes (an entry starts with a non-zero slot)."""
    end = len(chunk.rstrip(b"\0"))
    end = -(-end // ENTRY_SIZE) * ENTRY_SIZE
    return bytes(chunk[:end])


# -- head ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ObjectRef:
    """Where a sealed object lives in a pack, and the tag it must have."""

    pack: int
    offset: int
    length: int
    tag: bytes


@dataclass(frozen=True, slots=True)
class Head:
    fs_id: bytes
    counter: int
    root: ObjectRef


def pack_head(head: Head, mac_key: bytes) -> bytes:
    body = _HEAD.pack(
        HEAD_MAGIC,
        head.fs_id,
        head.counter,
        head.root.pack,
        head.root.offset,
        head.root.length,
        head.root.tag,
    )
    return body + hmac.digest(mac_key, body, "sha256")


def parse_head(raw: bytes, fs_id: bytes, mac_key: bytes) -> Head:
    if len(raw) != HEAD_SIZE or not raw.startswith(HEAD_MAGIC):
        raise IntegrityError(f"head: {len(raw)} bytes, not a version {VERSION} commit record")
    body, mac = raw[:-32], raw[-32:]
    if not hmac.compare_digest(mac, hmac.digest(mac_key, body, "sha256")):
        raise IntegrityError("head: MAC check failed (tampered commit record)")
    _, got_id, counter, pack, offset, length, tag = _HEAD.unpack(body)
    if got_id != fs_id:
        raise IntegrityError("head: belongs to another filesystem")
    return Head(got_id, counter, ObjectRef(pack, offset, length, tag))


def unpack_head(raw: bytes) -> Head:
    """The head's fields, its MAC not checked: for tools that hold no key (``sefs info``)."""
    if len(raw) != HEAD_SIZE or not raw.startswith(HEAD_MAGIC):
        raise FormatError(f"head: {len(raw)} bytes, not a version {VERSION} commit record")
    _, fs_id, counter, pack, offset, length, tag = _HEAD.unpack_from(raw)
    return Head(fs_id, counter, ObjectRef(pack, offset, length, tag))


# -- root --------------------------------------------------------------------------------
@dataclass(slots=True)
class Root:
    """The page table: page ``i`` holds the records with keys in
    ``[first_keys[i], first_keys[i + 1])``; ``first_keys[0]`` is empty."""

    next_ino: int
    first_keys: list[bytes] = field(default_factory=list)
    pages: list[ObjectRef] = field(default_factory=list)


def pack_root(root: Root) -> bytes:
    parts = [_ROOT_HEAD.pack(ROOT_MAGIC, root.next_ino, len(root.pages))]
    for first, r in zip(root.first_keys, root.pages, strict=True):
        parts.append(struct.pack(">H", len(first)))
        parts.append(first)
        parts.append(_TABLE_ENTRY.pack(r.pack, r.offset, r.length, r.tag))
    return b"".join(parts)


def parse_root(raw: bytes) -> Root:
    try:
        magic, next_ino, count = _ROOT_HEAD.unpack_from(raw)
        pos = _ROOT_HEAD.size
        root = Root(next_ino)
        for _ in range(count):
            (klen,) = struct.unpack_from(">H", raw, pos)
            first = raw[pos + 2 : pos + 2 + klen]
            pos += 2 + klen
            root.first_keys.append(first)
            root.pages.append(ObjectRef(*_TABLE_ENTRY.unpack_from(raw, pos)))
            pos += _TABLE_ENTRY.size
    except struct.error:
        raise IntegrityError("root: truncated page table") from None
    if magic != ROOT_MAGIC or pos != len(raw) or not count:
        raise IntegrityError("root: malformed page table")
    keys = root.first_keys
    if keys[0] != b"" or any(a >= b for a, b in itertools.pairwise(keys)):
        raise IntegrityError("root: page key ranges out of order")
    return root


# -- pages -------------------------------------------------------------------------------
def frame_record(key: bytes, value: bytes) -> bytes:
    """One record as a page holds it: ``key_len u16 || value_len u32 || key || value``."""
    return _RECORD_HEAD.pack(len(key), len(value)) + key + value


def pack_framed(frames: list[bytes]) -> bytes:
    """Page plaintext from framed records (:func:`frame_record`), sorted by key."""
    return struct.pack(">I", len(frames)) + b"".join(frames)


def pack_page(records: list[tuple[bytes, bytes]]) -> bytes:
    """Page plaintext from (key, value) pairs, which the caller sorts by key."""
    return pack_framed([frame_record(key, value) for key, value in records])


def parse_page(raw: bytes) -> list[tuple[bytes, bytes]]:
    try:
        (count,) = struct.unpack_from(">I", raw)
        pos = 4
        out = []
        for _ in range(count):
            klen, vlen = _RECORD_HEAD.unpack_from(raw, pos)
            pos += _RECORD_HEAD.size
            key = raw[pos : pos + klen]
            value = raw[pos + klen : pos + klen + vlen]
            pos += klen + vlen
            if len(key) != klen or len(value) != vlen:
                raise IntegrityError("metadata page: record runs past the end")
            out.append((key, value))
    except struct.error:
        raise IntegrityError("metadata page: truncated record") from None
    if pos != len(raw):
        raise IntegrityError("metadata page: trailing bytes")
    return out


# -- record keys -------------------------------------------------------------------------
def inode_key(ino: int) -> bytes:
    return b"i" + _U64.pack(ino)


def entry_key(parent: int, name: bytes) -> bytes:
    return b"e" + _U64.pack(parent) + name


def map_key(ino: int, chunk: int) -> bytes:
    return b"m" + _U64.pack(ino) + _U64.pack(chunk)


def split_key(key: bytes) -> tuple[bytes, int, bytes]:
    """(kind, ino, rest): the record kind, the inode it belongs to, and the rest of the key."""
    if len(key) < 9:
        raise IntegrityError("metadata record: malformed key")
    return key[:1], _U64.unpack_from(key, 1)[0], key[9:]


def pack_entry(ino: int, cookie: int) -> bytes:
    return _ENTRY_VALUE.pack(ino, cookie)


def parse_entry(value: bytes) -> tuple[int, int]:
    if len(value) != _ENTRY_VALUE.size:
        raise IntegrityError("directory entry: malformed")
    return _ENTRY_VALUE.unpack(value)


@dataclass(slots=True)
class InodeRecord:
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    parent: int = 0
    next_cookie: int = 0
    entry_count: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def pack_inode(r: InodeRecord) -> bytes:
    return inode_value(
        (r.mode, r.nlink, r.uid, r.gid, r.rdev, r.size, r.atime_ns, r.mtime_ns, r.ctime_ns,
         r.parent, r.next_cookie, r.entry_count),
        r.target,
        r.xattrs,
    )  # fmt: skip


_PLAIN_INODE_TAIL = struct.pack(">II", 0, 0)  # no target, no xattrs


def inode_value(fields: tuple[int, ...], target: bytes, xattrs: dict[bytes, bytes]) -> bytes:
    """An inode record's value from its twelve fixed fields (in _INODE order), its
    symlink target and its xattrs: what a commit calls once per changed inode."""
    head = _INODE.pack(*fields)
    if not target and not xattrs:
        return head + _PLAIN_INODE_TAIL
    parts = [head, struct.pack(">I", len(target)), target, struct.pack(">I", len(xattrs))]
    for name, value in sorted(xattrs.items()):
        parts.append(_RECORD_HEAD.pack(len(name), len(value)))
        parts.append(name)
        parts.append(value)
    return b"".join(parts)


def parse_inode(value: bytes) -> InodeRecord:
    try:
        fields = _INODE.unpack_from(value)
        pos = _INODE.size
        (tlen,) = struct.unpack_from(">I", value, pos)
        pos += 4
        target = value[pos : pos + tlen]
        pos += tlen
        (xcount,) = struct.unpack_from(">I", value, pos)
        pos += 4
        xattrs = {}
        for _ in range(xcount):
            nlen, vlen = _RECORD_HEAD.unpack_from(value, pos)
            pos += _RECORD_HEAD.size
            xattrs[value[pos : pos + nlen]] = value[pos + nlen : pos + nlen + vlen]
            pos += nlen + vlen
    except struct.error:
        raise IntegrityError("inode record: truncated") from None
    if pos != len(value) or len(target) != tlen:
        raise IntegrityError("inode record: malformed")
    return InodeRecord(*fields, target=target, xattrs=xattrs)


# -- the log (version 3) ---------------------------------------------------------------
LogRecord = tuple[bytes, bytes | None]  # key, value (None: the record was deleted)
LogBlock = tuple[int, int, bytes, bytes]  # ino, block, map entry (29), ciphertext (4096)


def pack_log_head(fs_id: bytes, counter: int, root_tag: bytes) -> bytes:
    return _LOG_HEAD.pack(LOG_MAGIC, fs_id, counter, root_tag)


def parse_log_head(raw: bytes) -> tuple[bytes, int, bytes]:
    """(fs_id, base counter, base root tag) of a log; IntegrityError if it is not one."""
    if len(raw) < LOG_HEAD_SIZE or not raw.startswith(LOG_MAGIC):
        raise IntegrityError(f"log: {len(raw)} bytes, not a version 3 log")
    _, fs_id, counter, tag = _LOG_HEAD.unpack_from(raw)
    return fs_id, counter, tag


def pack_log_body(next_ino: int, records: list[LogRecord], blocks: list[LogBlock]) -> bytes:
    """An entry's plaintext: ``next_ino u64 || count u32 || records || count u32 || blocks``."""
    parts = [_U64.pack(next_ino), struct.pack(">I", len(records))]
    for key, value in records:
        parts.append(_LOG_RECORD.pack(len(key), value is not None, len(value or b"")))
        parts.append(key)
        parts.append(value or b"")
    parts.append(struct.pack(">I", len(blocks)))
    for ino, block, entry, cipher in blocks:
        parts.append(_LOG_BLOCK.pack(ino, block))
        parts.append(entry)
        parts.append(cipher)
    return b"".join(parts)


def parse_log_body(raw: bytes) -> tuple[int, list[LogRecord], list[LogBlock]]:
    try:
        (next_ino,) = _U64.unpack_from(raw)
        (count,) = struct.unpack_from(">I", raw, 8)
        pos = 12
        records: list[LogRecord] = []
        for _ in range(count):
            klen, present, vlen = _LOG_RECORD.unpack_from(raw, pos)
            pos += _LOG_RECORD.size
            key, value = raw[pos : pos + klen], raw[pos + klen : pos + klen + vlen]
            pos += klen + vlen
            if len(key) != klen or len(value) != vlen or present > 1 or (vlen and not present):
                raise IntegrityError("log entry: malformed record")
            records.append((key, value if present else None))
        (count,) = struct.unpack_from(">I", raw, pos)
        pos += 4
        if len(raw) - pos != count * LOG_BLOCK_SIZE:
            raise IntegrityError("log entry: malformed blocks")
        blocks: list[LogBlock] = []
        for _ in range(count):
            ino, block = _LOG_BLOCK.unpack_from(raw, pos)
            pos += _LOG_BLOCK.size
            entry = raw[pos : pos + ENTRY_SIZE]
            blocks.append(
                (ino, block, entry, raw[pos + ENTRY_SIZE : pos + ENTRY_SIZE + BLOCK_SIZE])
            )
            pos += ENTRY_SIZE + BLOCK_SIZE
    except struct.error:
        raise IntegrityError("log entry: truncated") from None
    return next_ino, records, blocks


def check_version(version: object) -> None:
    if version != VERSION:
        raise FormatError(
            f"SEFS format version {version!r} is not supported (this build reads version {VERSION})"
        )
