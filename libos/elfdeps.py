"""Shared-library dependencies of ELF files, asked of the program's own ELF interpreter.

``ld.so --list FILE`` (glibc) and ``ld-musl-*.so.1 --list FILE`` (musl) print
what the loader would map, one line each: ``name => /abs/path (0x...)`` or
``/abs/path (0x...)``. Only absolute paths are dependencies to copy; the
kernel's vDSO has none. A static program (no dynamic section) loads nothing and
is not asked. A shared object has no interpreter of its own: the interpreter of
the programs it is copied with answers for it.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

from occlumfs.errors import FormatError

ELF_MAGIC = b"\x7fELF"
PT_DYNAMIC, PT_INTERP = 2, 3
ET_EXEC, ET_DYN = 2, 3
HOST_GLIBC_LOADER = "/lib64/ld-linux-x86-64.so.2"
_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(\S+)?\s*(?:\(0x[0-9a-fA-F]+\))?\s*$")


def is_elf(path: Path) -> bool:
    """Whether ``path`` is a loadable ELF file (a program or a shared object, not a .o)."""
    try:
        with open(path, "rb") as f:
            head = f.read(18)
    except OSError:
        return False
    return len(head) == 18 and head[:4] == ELF_MAGIC and head[16] in (ET_EXEC, ET_DYN)


def _segments(path: Path) -> list[tuple[int, int, int]]:
    """(p_type, p_offset, p_filesz) of each program header of a 64-bit little-endian
    ELF file; none for anything else."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != ELF_MAGIC or head[4] != 2 or head[5] != 1:
            return []
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        if phentsize < 56 or phnum > 4096:
            return []
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return [
        (
            struct.unpack_from("<I", table, i * phentsize)[0],
            struct.unpack_from("<Q", table, i * phentsize + 8)[0],
            struct.unpack_from("<Q", table, i * phentsize + 32)[0],
        )
        for i in range(min(phnum, len(table) // phentsize))
    ]


def interpreter(path: Path) -> str | None:
    """The PT_INTERP path of a 64-bit little-endian ELF file, or None (static, or a .so)."""
    for p_type, offset, size in _segments(path):
        if p_type == PT_INTERP:
            if size > 4096:
                return None
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(size).split(b"\0", 1)[0].decode("utf-8", "replace") or None
    return None


def is_static(path: Path) -> bool:
    """Whether an ELF file has no dynamic section: a statically linked program, which
    loads no libraries (glibc's loader, asked to list one, crashes)."""
    segments = _segments(path)
    return bool(segments) and all(p_type != PT_DYNAMIC for p_type, _, _ in segments)


def list_deps(path: Path, loader: str) -> tuple[list[str], list[str]]:
    """(absolute paths of the dependencies, names the loader could not find)."""
    try:
        proc = subprocess.run(
            [loader, "--list", os.fspath(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError as exc:
        raise FormatError(
            f"{path}: cannot run its ELF interpreter {loader}: {exc.strerror}"
        ) from None
    found: list[str] = []
    missing: list[str] = []
    for line in proc.stdout.splitlines():
        if "=> not found" in line:
            missing.append(line.split("=>", 1)[0].strip())
            continue
        m = _LINE.match(line)
        if m and m.group(2) and m.group(2).startswith("/"):
            found.append(m.group(2))
    if proc.returncode != 0 and not found and not missing:
        missing.append(f"({loader} --list failed: {proc.stderr.strip()[:200]})")
    return found, missing
