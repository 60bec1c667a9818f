"""A power-loss simulator for SEFS tests: storage in memory with a power switch.

A test double, not product code: the filesystem only uses the
:class:`~occlumfs.sefs.storage.Storage` contract, so a crash can be placed
anywhere by keeping what was made durable (``fsync``/``fsync_dir``) apart from
what was not.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from occlumfs.sefs.storage import Storage


@dataclass
class _SimFile:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


class PowerCut(Exception):
    """The simulated machine lost power in the middle of an operation."""


class PowerLossStorage(Storage):
    """In memory, with a power switch: ``power_loss()`` forgets every write and every
    directory change that was not fsync'd, as a disk losing its write cache would.

    ``cut_power_after(n)`` lets ``n`` more changing operations through and fails
    every one after, so a crash can be placed anywhere, mid-commit included.
    """

    def __init__(self) -> None:
        self._names: dict[str, dict[str, _SimFile]] = {"": {}}
        self._durable_names: dict[str, dict[str, _SimFile]] = {"": {}}
        self.fsyncs = 0
        self.changes = 0  # changing operations so far
        self._budget: int | None = None

    def cut_power_after(self, n: int | None) -> None:
        self._budget = n

    def _change(self) -> None:
        if self._budget is not None:
            if self._budget <= 0:
                raise PowerCut("power cut")
            self._budget -= 1
        self.changes += 1

    @staticmethod
    def _split(name: str) -> tuple[str, str]:
        parent, _, base = name.rpartition("/")
        return parent, base

    def _file(self, name: str) -> _SimFile:
        parent, base = self._split(name)
        try:
            return self._names[parent][base]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name) from None

    def mkdir(self, name: str) -> None:
        self._names.setdefault(name, {})
        self._durable_names.setdefault(name, {})

    def read(self, name: str) -> bytes:
        return bytes(self._file(name).data)

    def preadv(self, name: str, offset: int, buffers: Sequence[memoryview]) -> int:
        data = self._file(name).data
        total = 0
        for buf in buffers:
            piece = data[offset + total : offset + total + len(buf)]
            buf[: len(piece)] = piece
            total += len(piece)
            if len(piece) < len(buf):
                break
        return total

    def pwritev(self, name: str, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        self._change()
        parent, base = self._split(name)
        f = self._names[parent].setdefault(base, _SimFile())
        data = b"".join(bytes(b) for b in buffers)
        if len(f.data) < offset:
            f.data.extend(bytes(offset - len(f.data)))
        f.data[offset : offset + len(data)] = data

    def write_file(self, name: str, data: bytes) -> None:
        self._change()
        parent, base = self._split(name)
        f = self._names[parent].setdefault(base, _SimFile())
        f.data[:] = data

    def fsync(self, name: str) -> None:
        self._change()
        f = self._file(name)
        f.durable = bytes(f.data)
        self.fsyncs += 1

    def fsync_dir(self, name: str) -> None:
        self._change()
        self._durable_names[name] = dict(self._names[name])
        self.fsyncs += 1

    def rename(self, src: str, dst: str) -> None:
        self._change()
        sp, sb = self._split(src)
        dp, db = self._split(dst)
        self._names[dp][db] = self._names[sp].pop(sb)

    def unlink(self, name: str) -> None:
        self._change()
        parent, base = self._split(name)
        self._file(name)
        del self._names[parent][base]

    def listdir(self, name: str) -> list[str]:
        return list(self._names[name])

    def exists(self, name: str) -> bool:
        parent, base = self._split(name)
        return base in self._names.get(parent, {})

    def power_loss(self) -> None:
        self._budget = None
        self._names = {d: dict(names) for d, names in self._durable_names.items()}
        for names in self._names.values():
            for f in names.values():
                f.data = bytearray(f.durable)

    def files(self) -> dict[str, bytes]:
        """Every file's current contents, by name (for tests that tamper)."""
        return {
            (f"{d}/{n}" if d else n): bytes(f.data)
            for d, names in self._names.items()
            for n, f in names.items()
        }
