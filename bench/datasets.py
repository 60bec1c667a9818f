"""Input trees and files, generated once per run in the scratch directory.

Contents are pseudo-random (AES-CTR keystream, seeded) so no filesystem can
win by deduplicating or compressing them, and two runs build the same bytes.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bench.stats import KiB, MiB

CHUNK = 4 * MiB


class Keystream:
    """Deterministic incompressible bytes: AES-128-CTR over zeros, keyed by a seed string."""

    def __init__(self, seed: str) -> None:
        key = (seed.encode() * 16)[:16] if seed else bytes(16)
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = bytes(CHUNK)

    def read(self, n: int) -> bytes:
        if n <= CHUNK:
            return self._enc.update(self._zeros[:n])
        return b"".join(self.read(min(CHUNK, n - i)) for i in range(0, n, CHUNK))


def random_file(path: Path, size: int, seed: str) -> Path:
    stream = Keystream(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        written = 0
        while written < size:
            n = min(CHUNK, size - written)
            f.write(stream.read(n))
            written += n
    return path


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_ignore(directory: str, names: list[str]) -> set[str]:
    # Bytecode caches differ from machine to machine and run to run; installed
    # third-party packages are not the standard library.
    return {n for n in names if n in ("__pycache__", "site-packages", "dist-packages")}


QUICK_MAX_FILE = 256 * KiB


def copy_stdlib(dest: Path, max_files: int | None = None) -> tuple[int, int]:
    """Copy the running interpreter's stdlib to ``dest``; returns (files, bytes).

    ``max_files`` keeps the first files in sorted order, none over 256 KiB
    (quick mode: the stdlib dir can hold a 40 MB static libpython).
    """
    src = stdlib_dir()
    if max_files is None:
        shutil.copytree(src, dest, symlinks=True, ignore=_stdlib_ignore)
    else:
        copied = 0
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if d not in _stdlib_ignore(root, dirs))
            for name in sorted(files):
                if copied >= max_files:
                    break
                source = Path(root, name)
                if not source.is_file() or source.is_symlink():
                    continue
                if source.stat().st_size > QUICK_MAX_FILE:
                    continue
                target = dest / source.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target, follow_symlinks=False)
                copied += 1
        dest.mkdir(parents=True, exist_ok=True)
    return tree_stats(dest)


def tree_stats(root: Path) -> tuple[int, int]:
    """(regular files, bytes in them) under ``root``."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if os.path.isfile(os.path.join(dirpath, name)) and not os.path.islink(
                os.path.join(dirpath, name)
            ):
                files += 1
                size += st.st_size
    return files, size


def mixed_tree(dest: Path, total: int, seed: str = "mixed") -> tuple[int, int]:
    """A few large files (~90% of ``total``) and many small ones (1-64 KiB) in nested dirs."""
    big_share = total * 9 // 10
    big_files = 3
    for i in range(big_files):
        random_file(dest / "large" / f"blob{i}.bin", big_share // big_files, f"{seed}-big{i}")
    stream = Keystream(f"{seed}-small")
    budget = total - big_share
    i = 0
    while budget > 0:
        size = min(budget, (1 + (i * 7919) % 64) * KiB - (i % 97))
        path = dest / "small" / f"d{i // 200:03d}" / f"f{i:05d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(stream.read(size))
        budget -= size
        i += 1
    return tree_stats(dest)


def many_files_tree(dest: Path, count: int, per_dir: int = 1000) -> None:
    """``count`` small distinct files, ``per_dir`` to a directory."""
    for i in range(count):
        d = dest / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:06d}.txt").write_bytes(f"file {i}\n".encode() * (1 + i % 32))


def make_tarball(tree: Path, tarball: Path) -> None:
    from bench.system import run

    run(["tar", "-cf", str(tarball), "-C", str(tree), "."])
