"""Shared-library dependencies of ELF files, asked of the program's own ELF interpreter.

``ld.so --list FILE`` (glibc) and ``ld-musl-*.so.1 --list FILE`` (musl) print
what the loader would map, one line each: ``name => /abs/path (0x...)`` or
``/abs/path (0x...)``. Only absolute paths are dependencies to copy; the
kernel's vDSO has none. A shared object has no interpreter of its own: the
interpreter of the programs it is copied with answers for it.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

from occlumfs.errors import FormatError

ELF_MAGIC = b"\x7fELF"
PT_INTERP = 3
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


def interpreter(path: Path) -> str | None:
    """The PT_INTERP path of a 64-bit little-endian ELF file, or None (static, or a .so)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != ELF_MAGIC or head[4] != 2 or head[5] != 1:
            return None
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        if phentsize < 56 or phnum > 4096:
            return None
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(min(phnum, len(table) // phentsize)):
            (p_type,) = struct.unpack_from("<I", table, i * phentsize)
            if p_type == PT_INTERP:
                (offset,) = struct.unpack_from("<Q", table, i * phentsize + 8)
                (size,) = struct.unpack_from("<Q", table, i * phentsize + 32)
                if size > 4096:
                    return None
                f.seek(offset)
                return f.read(size).split(b"\0", 1)[0].decode("utf-8", "replace") or None
    return None


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
