"""A random mixed workload with a model of what must survive a crash.

Used by the crash tests and by bench/sefs_crash_soak.py. ``Workload.step``
applies one random operation to a filesystem object and to the model;
``fsync`` commits and moves the durable model forward.
"""

from __future__ import annotations

import copy
import errno
import os
import random
import stat

from occlumfs.errors import FSError
from occlumfs.fs import ROOT_INO, AttrChanges, Caller, Filesystem, iter_dir, lookup_path

ROOT = Caller()


def snapshot(fs: Filesystem) -> dict[str, object]:
    """Every path with what it holds: bytes for files, 'dir', or ('link', target)."""
    out: dict[str, object] = {}

    def walk(ino: int, prefix: str) -> None:
        for entry in iter_dir(fs, ino):
            path = prefix + entry.name.decode()
            if stat.S_ISDIR(entry.attr.mode):
                out[path] = "dir"
                walk(entry.attr.ino, path + "/")
            elif stat.S_ISLNK(entry.attr.mode):
                out[path] = ("link", fs.readlink(entry.attr.ino))
            else:
                fh = fs.open(entry.attr.ino, os.O_RDONLY)
                try:
                    out[path] = fs.read(fh, 0, entry.attr.size + 1)
                finally:
                    fs.release(fh)

    walk(ROOT_INO, "")
    return out


class Workload:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.model: dict[str, object] = {}
        self.durable: dict[str, object] = {}

    def _files(self) -> list[str]:
        return sorted(p for p, v in self.model.items() if isinstance(v, bytes))

    def _dirs(self) -> list[str]:
        return ["", *sorted(p + "/" for p, v in self.model.items() if v == "dir")]

    def _parent(self, fs: Filesystem, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        return (lookup_path(fs, head).ino if head else ROOT_INO), name.encode()

    def step(self, fs: Filesystem) -> str:
        rng = self.rng
        files = self._files()
        op = rng.choice(
            ["write", "write", "write", "truncate", "rename", "unlink", "mkdir", "symlink", "fsync"]
        )
        if op in ("truncate", "rename", "unlink") and not files:
            op = "write"
        if op == "write":
            if files and rng.random() < 0.5:
                path = rng.choice(files)
            else:
                path = rng.choice(self._dirs()) + f"f{rng.randrange(1000)}"
                if path in self.model:
                    return "skip"
            old = self.model.get(path, b"")
            offset = rng.choice([0, len(old), rng.randrange(0, 70_000)])
            data = rng.randbytes(rng.choice([1, 100, 4096, 5000, 40_000]))
            parent, name = self._parent(fs, path)
            if path in self.model:
                fh = fs.open(lookup_path(fs, path).ino, os.O_WRONLY)
            else:
                fh, _ = fs.create(parent, name, 0o644, os.O_WRONLY, ROOT)
            fs.write(fh, offset, data)
            fs.release(fh)
            grown = old + bytes(max(0, offset - len(old)))
            self.model[path] = grown[:offset] + data + grown[offset + len(data) :]
        elif op == "truncate":
            path = rng.choice(files)
            size = rng.randrange(0, 60_000)
            fs.setattr(lookup_path(fs, path).ino, AttrChanges(size=size))
            old = self.model[path]
            self.model[path] = old[:size] + bytes(max(0, size - len(old)))
        elif op == "rename":
            src = rng.choice(files)
            dst = rng.choice([*files, rng.choice(self._dirs()) + f"r{rng.randrange(1000)}"])
            if self.model.get(dst, b"") not in (b"",) and not isinstance(
                self.model.get(dst), bytes
            ):
                return "skip"
            if dst == src:
                return "skip"
            sp, sn = self._parent(fs, src)
            dp, dn = self._parent(fs, dst)
            fs.rename(sp, sn, dp, dn)
            self.model[dst] = self.model.pop(src)
        elif op == "unlink":
            path = rng.choice(files)
            parent, name = self._parent(fs, path)
            fs.unlink(parent, name)
            del self.model[path]
        elif op == "mkdir":
            path = rng.choice(self._dirs()) + f"d{rng.randrange(100)}"
            if path in self.model or path.count("/") > 3:
                return "skip"
            parent, name = self._parent(fs, path)
            fs.mkdir(parent, name, 0o755, ROOT)
            self.model[path] = "dir"
        elif op == "symlink":
            path = rng.choice(self._dirs()) + f"l{rng.randrange(100)}"
            if path in self.model:
                return "skip"
            parent, name = self._parent(fs, path)
            target = f"target-{rng.randrange(10**6)}".encode()
            try:
                fs.symlink(parent, name, target, ROOT)
            except FSError as exc:  # pragma: no cover - the model says it is free
                raise AssertionError(errno.errorcode[exc.errno]) from None
            self.model[path] = ("link", target)
        else:
            self.fsync(fs)
        return op

    def fsync(self, fs: Filesystem) -> None:
        pending = copy.deepcopy(self.model)
        self.in_flight = pending
        fh = fs.opendir(ROOT_INO)
        fs.fsyncdir(fh, False)
        fs.releasedir(fh)
        self.durable = pending
        self.in_flight = None


def run_until_power_cut(sim, seed: int, cut_after: int | None, steps: int = 400) -> Workload:
    """Run ``steps`` random operations (then an fsync) on ``sim`` (a SimVolume) until the
    power goes out after ``cut_after`` changing writes (None: never), then cut it."""
    from sefs.powerloss import PowerCut

    fs = sim.open(commit_interval=float("inf"))
    load = Workload(seed)
    load.in_flight = None
    sim.storage.cut_power_after(cut_after)
    try:
        for _ in range(steps):
            load.step(fs)
        load.fsync(fs)
    except PowerCut:
        pass
    sim.storage.power_loss()
    return load
