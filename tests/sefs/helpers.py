"""Shared helpers for the SEFS tests: volumes on disk and in simulated storage."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from occlumfs.fs import Caller, lookup_path
from occlumfs.keys import write_key_file
from occlumfs.sefs import Credential, SefsFS, create_sefs, format_storage, open_sefs_fs
from occlumfs.sefs.fsck import check_fs
from occlumfs.sefs.keys import Keys, parse_config, unwrap_master
from sefs.powerloss import PowerLossStorage

ROOT = Caller()


@dataclass
class Volume:
    """A SEFS directory on disk, its key file and its trusted state dir."""

    dir: Path
    key_file: Path
    key: bytes
    state: Path

    def open(self, **kwargs) -> SefsFS:
        return open_sefs_fs(self.dir, key=self.key, state_dir=self.state, **kwargs)

    def mount_args(self) -> list[str]:
        return [str(self.dir), "--key-file", str(self.key_file), "--state-dir", str(self.state)]

    def fsck_args(self) -> list[str]:
        return [
            "fsck",
            str(self.dir),
            "--key-file",
            str(self.key_file),
            "--state-dir",
            str(self.state),
        ]

    def copy(self, where: Path) -> Volume:
        where.mkdir(parents=True)
        shutil.copytree(self.dir, where / "fs")
        if self.state.exists():
            shutil.copytree(self.state, where / "state")
        return Volume(where / "fs", self.key_file, self.key, where / "state")

    def host_files(self) -> dict[str, bytes]:
        return {
            str(p.relative_to(self.dir)): p.read_bytes()
            for p in sorted(self.dir.rglob("*"))
            if p.is_file()
        }

    def data_file_of(self, path: str) -> Path:
        fs = self.open(read_only=True)
        try:
            ino = lookup_path(fs, path).ino
        finally:
            fs.close()
        return self.dir / "d" / f"{ino:016x}"


def make_volume(where: Path) -> Volume:
    where.mkdir(parents=True, exist_ok=True)
    key_file = where / "key"
    key = write_key_file(key_file)
    state = where / "state"
    create_sefs(where / "fs", Credential(key=key), state_dir=state)
    return Volume(where / "fs", key_file, key, state)


class SimVolume:
    """A SEFS in :class:`PowerLossStorage`: in-process, with a power switch."""

    def __init__(self) -> None:
        self.storage = PowerLossStorage()
        self.storage.mkdir("m")
        self.storage.mkdir("d")
        self.cred = Credential(key=b"\x01" * 16)
        format_storage(self.storage, self.cred)

    def open(self, **kwargs) -> SefsFS:
        config = parse_config(self.storage.read("sefs.json"), "sim")
        keys = Keys(unwrap_master(config, self.cred, "sim"), bytes.fromhex(config["fs_id"]))
        return SefsFS(self.storage, keys, **kwargs)


def fsck_problems(fs_factory) -> list[str]:
    fs = fs_factory(read_only=True, tolerant=True)
    return list(check_fs(fs))


def write_file(fs: SefsFS, parent: int, name: bytes, data: bytes) -> int:
    fh, attr = fs.create(parent, name, 0o644, os.O_WRONLY, ROOT)
    fs.write(fh, 0, data)
    fs.release(fh)
    return attr.ino


def read_path(fs: SefsFS, path: str) -> bytes:
    attr = lookup_path(fs, path)
    fh = fs.open(attr.ino, os.O_RDONLY)
    try:
        return fs.read(fh, 0, attr.size + 1)
    finally:
        fs.release(fh)


def server_pid(volume_dir: Path) -> int:
    return int((volume_dir / "lock").read_text().strip())


def force_unmount(mnt: Path) -> None:
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
