"""The reference tree: one host directory holding every read-side feature.

:func:`build_reference_tree` makes it; the constants below say what it holds,
and the read tests check each subject against both the constants and the host
directory itself (the oracle). Running as root is required (owners, device
nodes), which is how the suite runs.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20


def pattern(seed: str, size: int) -> bytes:
    """Deterministic, incompressible bytes: SHA-256 in counter mode."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


# Regular files: path -> contents.
SMALL = b"hello, occlumfs\n"
BLOCKS = pattern("blocks", 3 * 4096 + 123)  # ends inside its fourth block
BIG = pattern("big", 2 * MiB + 17)
FILES = {
    "small.txt": SMALL,
    "empty": b"",
    "blocks.bin": BLOCKS,
    "big.bin": BIG,
    "exactly-one-block": pattern("one", 4096),
}

# Sparse files: path -> (size, {offset: data}); everything else is a hole.
SPARSE = {
    "sparse/huge": (
        5 * GiB + 4097,
        {
            0: b"head",
            MiB + 100: pattern("mid", 5000),  # crosses a block boundary
            4 * GiB - 3: b"across-4GiB",  # straddles offset 2**32
            5 * GiB + 4000: b"tail",
        },
    ),
    "sparse/all-hole": (3 * MiB, {}),
    "sparse/trailing-hole": (1 * MiB, {0: b"only the start"}),
}

# Symlinks: path -> target.
LONG_TARGET = b"/".join([b"t" * 200] * 19)  # 3,818 bytes: near PATH_MAX
SYMLINKS = {
    "links/relative": b"../small.txt",
    "links/absolute": b"/etc/occlumfs-conformance/absolute-target",
    "links/dangling": b"does/not/exist",
    "links/to-dir": b"../tree",
    "links/long-target": LONG_TARGET,
    "links/non-utf8-target": b"caf\xe9-\xff",
}

# Hard links: groups of paths sharing one inode.
HARDLINKS = [
    ("hard/one", "hard/two", "tree/a/hard-three"),
    ("hard/pair-a", "hard/pair-b"),
]
HARDLINK_DATA = {HARDLINKS[0][0]: b"three names", HARDLINKS[1][0]: b"two names"}

# Extended attributes: path -> {name: value}.
MANY_XATTRS = {f"user.attr{i:03d}".encode(): f"value {i}".encode() for i in range(64)}
XATTRS = {
    "xattr/file": {
        b"user.plain": b"value",
        b"user.binary": bytes(range(256)),
        b"user.empty": b"",
        b"user.utf8-\xc3\xa9": "é".encode(),
    },
    "xattr/many": MANY_XATTRS,
    "xattr/dir": {b"user.on-a-dir": b"yes"},
}

# Permission bits, owners: path -> (mode bits, uid, gid).
MODES = {
    "modes/setuid": (0o4755, 0, 0),
    "modes/setgid": (0o2711, 0, 0),
    "modes/all-bits": (0o7777, 0, 0),
    "modes/none": (0o000, 0, 0),
    "modes/owned": (0o640, 1234, 5678),
    "modes/big-ids": (0o600, 4_000_000_000, 3_999_999_999),
}
DIR_MODES = {
    "modes/sticky-dir": (0o1777, 0, 0),
    "modes/private-dir": (0o700, 4321, 8765),
}

# Special files: path -> (type bits, rdev).
SPECIAL = {
    "special/char": (stat.S_IFCHR, os.makedev(1, 3)),
    "special/block": (stat.S_IFBLK, os.makedev(259, 65537)),  # a minor > 255
    "special/fifo": (stat.S_IFIFO, 0),
}

# Names.
NON_UTF8_NAMES = [b"caf\xe9", b"\xff\xfe\xfd", b"mixed-\xc3\xa9-\xe9"]
UTF8_NAME = "héllo wörld ✓ 日本".encode()
LONG_NAMES = [b"L" * 255, ("✓" * 85).encode()]  # both exactly 255 bytes
DEEP_LEVELS = 100
DEEP_PATH = "/".join(["deep"] + ["d"] * DEEP_LEVELS)
DEEP_FILE = DEEP_PATH + "/bottom"

BIG_DIR = "dir10k"
BIG_DIR_COUNT = 10_000


def big_dir_names() -> list[bytes]:
    return [f"entry-{i:05d}".encode() for i in range(BIG_DIR_COUNT)]


# Modification times, to the nanosecond, including one past 2038 (needs 64 bits).
BASE_MTIME_NS = 1_600_000_000_123_456_789
FUTURE_MTIME_NS = 4_102_444_800_987_654_321  # 2100-01-01
FUTURE_MTIME_PATH = "small.txt"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_reference_tree(root: Path) -> None:
    """Make the reference tree at ``root`` (which must not exist)."""
    root.mkdir()
    for rel, data in FILES.items():
        _write(root / rel, data)
    for rel, (size, pieces) in SPARSE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(root / rel, "wb") as f:
            for offset, data in pieces.items():
                f.seek(offset)
                f.write(data)
            f.truncate(size)
    (root / "tree/a/b").mkdir(parents=True)
    (root / "tree/a/b/leaf").write_bytes(b"leaf")
    (root / "tree/empty-dir").mkdir()
    for rel, target in SYMLINKS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, os.fsencode(root / rel))
    for group in HARDLINKS:
        _write(root / group[0], HARDLINK_DATA[group[0]])
        for other in group[1:]:
            (root / other).parent.mkdir(parents=True, exist_ok=True)
            os.link(root / group[0], root / other)
    for rel, attrs in XATTRS.items():
        path = root / rel
        if rel.endswith("dir"):
            path.mkdir(parents=True)
        else:
            _write(path, rel.encode())
        for name, value in attrs.items():
            os.setxattr(path, name, value)
    for rel, (mode, uid, gid) in MODES.items():
        _write(root / rel, rel.encode())
        os.chown(root / rel, uid, gid)
        os.chmod(root / rel, mode)
    for rel, (mode, uid, gid) in DIR_MODES.items():
        (root / rel).mkdir(parents=True)
        (root / rel / "inside").write_bytes(b"inside")
        os.chown(root / rel, uid, gid)
        os.chmod(root / rel, mode)
    for rel, (kind, rdev) in SPECIAL.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mknod(root / rel, kind | 0o640, rdev)
    names = root / "names"
    names.mkdir()
    for name in [*NON_UTF8_NAMES, UTF8_NAME, *LONG_NAMES]:
        with open(os.path.join(os.fsencode(names), name), "wb") as f:
            f.write(name)
    (root / DEEP_PATH).mkdir(parents=True)
    (root / DEEP_FILE).write_bytes(b"at the bottom")
    big = root / BIG_DIR
    big.mkdir()
    for name in big_dir_names():
        os.close(os.open(os.path.join(os.fsencode(big), name), os.O_CREAT | os.O_WRONLY, 0o644))
    _set_times(root)


def _set_times(root: Path) -> None:
    """Give every entry a distinct nanosecond mtime; directories last, deepest first."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        paths.extend(os.path.join(dirpath, n) for n in filenames)
        paths.extend(os.path.join(dirpath, n) for n in dirnames)
    is_dir = {p: os.path.isdir(p) and not os.path.islink(p) for p in paths}
    files = sorted(p for p in paths if not is_dir[p])
    dirs = sorted((p for p in paths if is_dir[p]), key=len, reverse=True)
    for index, path in enumerate([*files, *dirs, os.fsencode(root)]):
        ns = BASE_MTIME_NS + index * 1_000_001
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
    future = os.path.join(os.fsencode(root), FUTURE_MTIME_PATH.encode())
    os.utime(future, ns=(FUTURE_MTIME_NS, FUTURE_MTIME_NS))


def walk_reference(root: Path) -> list[bytes]:
    """Every path of the tree relative to ``root`` (bytes), parents before children."""
    base = os.fsencode(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        for name in sorted(dirnames) + sorted(filenames):
            out.append(name if rel == b"." else os.path.join(rel, name))
    return out
