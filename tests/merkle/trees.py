"""Source trees made in code, with fixed times and owners, and image surgery helpers.

Git keeps neither mtimes, owners, xattrs, device nodes nor sparseness, so every
tree a test builds an image from is created here, deterministically.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

from conformance.reference import pattern  # the suite's deterministic bytes; goldens depend on them

from occlumfs.merkle.format import BLOCK_SIZE, DESCRIPTOR_SIZE, Descriptor, Layout
from occlumfs.merkle.tree import build_levels, hash_blocks

GiB = 1 << 30
T0 = 1_650_000_000_123_456_789  # a fixed mtime, in ns


def set_times(root: Path, mtime_ns: int = T0) -> None:
    """Give every entry under ``root`` (and root) the same mtime, children first."""
    for dirpath, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            os.utime(os.path.join(dirpath, name), ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    os.utime(root, ns=(mtime_ns, mtime_ns))


def make_golden_tree(root: Path, order: str = "forward") -> Path:
    """Every feature the format stores, created in ``order`` ("forward" or "reverse")."""
    root.mkdir()
    root.chmod(0o755)
    steps = [
        lambda: (root / "empty").write_bytes(b""),
        lambda: (root / "one").write_bytes(b"A"),
        lambda: (root / "five").write_bytes(pattern("five", 5000)),
        lambda: (root / "five-copy").write_bytes(pattern("five", 5000)),
        lambda: (root / "blocks.bin").write_bytes(pattern("blocks", 3 * BLOCK_SIZE + 7)),
        lambda: (root / "zeros-inside").write_bytes(b"x" * 10 + bytes(3 * BLOCK_SIZE) + b"y" * 10),
        lambda: _sparse(root / "sparse-5g", 5 * GiB + 3, {0: b"head", 4 * GiB - 2: b"4GiB"}),
        lambda: (root / "dir" / "sub").mkdir(parents=True),
        lambda: (root / "dir" / "file").write_bytes(b"in a dir\n"),
        lambda: os.symlink("../one", root / "dir" / "rel-link"),
        lambda: os.symlink("/etc/passwd", root / "abs-link"),
        lambda: (root / "hard-a").write_bytes(b"linked\n"),
        lambda: os.link(root / "hard-a", root / "dir" / "hard-b"),
        lambda: os.mkfifo(root / "fifo"),
        lambda: os.mknod(root / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
        lambda: os.mknod(root / "blk", stat.S_IFBLK | 0o660, os.makedev(259, 65537)),
        lambda: (root / b"caf\xe9".decode("utf-8", "surrogateescape")).write_bytes(b"latin1"),
        lambda: os.setxattr(root / "one", "user.plain", b"value"),
        lambda: os.setxattr(root / "one", "user.binary", bytes(range(256))),
        lambda: os.setxattr(root / "dir", "user.on-dir", b"yes"),
        lambda: (root / "owned").write_bytes(b"owned\n"),
        # chown clears set-id bits, so the two go together, chown first.
        lambda: (os.lchown(root / "owned", 1234, 5678), os.chmod(root / "owned", 0o4751)),
    ]
    if order == "reverse":
        # The same tree built in another order: creators of what later steps
        # need first, then everything else backwards.
        creators = [steps[i] for i in (20, 11, 7, 1)]
        steps = creators + [s for s in reversed(steps) if s not in creators]
    # Modes must not depend on the caller's umask: the golden digests pin them.
    old_umask = os.umask(0o022)
    try:
        for step in steps:
            step()
    finally:
        os.umask(old_umask)
    set_times(root)
    os.utime(root / "dir" / "sub", ns=(T0 + 5, T0 + 5))
    return root


def _sparse(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)


def reseal(image: Path, mutate_plain=None) -> str:
    """Recompute the tree and header of an unencrypted image after editing its blocks.

    This is what an attacker who does not care about the digest can do: it
    yields an image whose tree is consistent, so only structural validation
    stands between a crafted record and the reader (and, for an encrypted image,
    the header MAC, which the attacker cannot recompute: the old one is kept).
    Returns the new digest.
    """
    raw = bytearray(image.read_bytes())
    desc = Descriptor.parse(bytes(raw[:DESCRIPTOR_SIZE]))
    layout = Layout.of(desc)
    if mutate_plain is not None:
        mutate_plain(raw, layout)
    covered = bytes(raw[BLOCK_SIZE : layout.tree_start * BLOCK_SIZE])
    levels, root = build_levels(hash_blocks(covered), layout.tree)
    tree = b"".join(levels)
    raw[layout.tree_start * BLOCK_SIZE :] = tree
    new = Descriptor(
        flags=desc.flags,
        image_blocks=desc.image_blocks,
        inode_count=desc.inode_count,
        heap_bytes=desc.heap_bytes,
        data_blocks=desc.data_blocks,
        sealed_blocks=desc.sealed_blocks,
        root_hash=root,
        key_check=desc.key_check,
        version=desc.version,
    )
    raw[:DESCRIPTOR_SIZE] = new.pack()
    image.write_bytes(bytes(raw))
    return new.digest()


def big_file_tree(root: Path, size: int, seed: int, others: dict[str, bytes]) -> bytes:
    """``root`` with big.bin (``size`` random bytes from ``seed``) and ``others``;
    returns the bytes of big.bin."""
    root.mkdir(parents=True)
    data = random.Random(seed).randbytes(size)
    (root / "big.bin").write_bytes(data)
    for name, content in others.items():
        (root / name).write_bytes(content)
    return data
