"""SEFS: a writable encrypted filesystem on untrusted host storage.

Confidentiality, integrity and freshness of contents, names and structure
(docs/formats/sefs.md); crash consistent by copy-on-write commits. This module
is the library's front door: create, open, re-key and describe a SEFS
directory. The filesystem object lives in :mod:`occlumfs.sefs.fs`.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

from occlumfs.errors import FormatError, NotFoundError, OcclumfsError, UsageError
from occlumfs.sefs import format as fmt
from occlumfs.sefs.fs import SefsFS
from occlumfs.sefs.keys import (
    Credential,
    Keys,
    dump_config,
    new_config,
    parse_config,
    read_passphrase_file,
    unwrap_master,
    wrap_master,
)
from occlumfs.sefs.state import DirLock, TrustedState, default_state_dir
from occlumfs.sefs.storage import DiskStorage, Storage

__all__ = [
    "Credential",
    "SefsFS",
    "change_credential",
    "create_sefs",
    "describe_sefs",
    "format_storage",
    "is_sefs_dir",
    "open_sefs_fs",
]


def is_sefs_dir(path: Path) -> bool:
    return (Path(path) / fmt.CONFIG_NAME).is_file()


def credential(
    key: bytes | None = None,
    passphrase_file: Path | None = None,
    passphrase: bytes | None = None,
) -> Credential:
    """The one credential given, or a usage error."""
    if passphrase_file is not None:
        passphrase = read_passphrase_file(passphrase_file)
    given = [x for x in (key, passphrase) if x is not None]
    if len(given) != 1:
        raise UsageError(
            "give exactly one of --key-file or --passphrase-file"
            if given
            else "no key given: use --key-file or --passphrase-file"
        )
    return Credential(key=key, passphrase=passphrase)


def _read_config(storage: Storage, where: Path | str) -> dict:
    try:
        raw = storage.read(fmt.CONFIG_NAME)
    except FileNotFoundError:
        raise NotFoundError(f"{where}: not a SEFS directory (no {fmt.CONFIG_NAME})") from None
    return parse_config(raw, f"{where}/{fmt.CONFIG_NAME}")


def format_storage(
    storage: Storage,
    cred: Credential,
    *,
    trusted_state_dir: Path | None = None,
    scrypt: dict | None = None,
) -> dict:
    """Write a new, empty SEFS into ``storage`` (whose m/ and d/ exist); return its config."""
    config, master = new_config(cred, scrypt)
    storage.write_file(fmt.CONFIG_NAME, dump_config(config))
    storage.fsync(fmt.CONFIG_NAME)
    keys = Keys(master, bytes.fromhex(config["fs_id"]))
    state = None
    if trusted_state_dir is not None:
        state = TrustedState(trusted_state_dir, keys.fs_id, keys.state_mac)
    fs = SefsFS(storage, keys, trusted_state=state, _new=True)
    fs.commit()
    return config


def create_sefs(
    path: Path,
    cred: Credential,
    *,
    state_dir: Path | None = None,
    scrypt: dict | None = None,
) -> dict:
    """Create a SEFS at ``path`` (absent or an empty directory), all or nothing."""
    path = Path(os.path.abspath(path))
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path}: exists and is not an empty directory")
    if not path.parent.is_dir():
        raise NotFoundError(f"{path.parent}: no such directory")
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        tmp.mkdir(mode=0o700)
        (tmp / fmt.META_DIR).mkdir()
        (tmp / fmt.DATA_DIR).mkdir()
        storage = DiskStorage(tmp)
        try:
            config = format_storage(
                storage, cred, trusted_state_dir=state_dir or default_state_dir(), scrypt=scrypt
            )
        finally:
            storage.close()
        if path.exists():
            path.rmdir()
        os.rename(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def open_sefs_fs(
    path: Path,
    *,
    key: bytes | None = None,
    passphrase_file: Path | None = None,
    passphrase: bytes | None = None,
    read_only: bool = False,
    state_dir: Path | None = None,
    tolerant: bool = False,
) -> SefsFS:
    """Open the SEFS at ``path`` for exclusive use (the lock is held until ``close``)."""
    path = Path(os.path.abspath(path))
    if not path.is_dir():
        raise NotFoundError(f"{path}: no such directory")
    storage = DiskStorage(path)
    config = _read_config(storage, path)
    cred = credential(key, passphrase_file, passphrase)
    try:
        master = unwrap_master(config, cred, str(path))
    except BaseException:
        storage.close()
        raise
    keys = Keys(master, bytes.fromhex(config["fs_id"]))
    lock = DirLock(path)
    lock.acquire()
    try:
        state = TrustedState(state_dir or default_state_dir(), keys.fs_id, keys.state_mac)
        return SefsFS(
            storage,
            keys,
            name=f"sefs:{path}",
            read_only=read_only,
            trusted_state=state,
            lock=lock,
            tolerant=tolerant,
        )
    except BaseException:
        storage.close()
        lock.release()
        raise


def change_credential(path: Path, old: Credential, new: Credential, scrypt: dict | None = None):
    """Re-wrap the master key under ``new``; no data is touched."""
    path = Path(os.path.abspath(path))
    storage = DiskStorage(path)
    config = _read_config(storage, path)
    master = unwrap_master(config, old, str(path))
    lock = DirLock(path)
    lock.acquire()
    try:
        config["wrap"] = wrap_master(master, bytes.fromhex(config["fs_id"]), new, scrypt)
        tmp = f"{fmt.CONFIG_NAME}.tmp"
        storage.write_file(tmp, dump_config(config))
        storage.fsync(tmp)
        storage.rename(tmp, fmt.CONFIG_NAME)
        storage.fsync_dir("")
    finally:
        storage.close()
        lock.release()


def describe_sefs(path: Path) -> dict:
    """The public facts about a SEFS directory, readable without a key (never secrets)."""
    path = Path(os.path.abspath(path))
    storage = DiskStorage(path)
    config = _read_config(storage, path)
    wrap = config["wrap"]
    out: dict = {
        "path": str(path),
        "format": config["format"],
        "version": config["version"],
        "fs_id": config["fs_id"],
        "block_size": config["block_size"],
        "cipher": config.get("cipher", "AES-256-GCM"),
        "key_kind": wrap["kind"],
    }
    if wrap["kind"] == "passphrase":
        out["scrypt"] = wrap["scrypt"]
    try:
        raw = storage.read(fmt.HEAD_NAME)
        if len(raw) != fmt.HEAD_SIZE:
            raise FormatError("head: wrong size")
        counter, pack, _offset, length = struct.unpack_from(">QQQI", raw, 24)
        out["commit_counter"] = counter
        out["root"] = f"{fmt.pack_name(pack)} ({length} bytes), tag {raw[52:68].hex()}"
    except (OSError, OcclumfsError) as exc:
        out["head"] = f"unreadable: {exc}"
    packs = [p for p in storage.listdir(fmt.META_DIR) if p.endswith(".pack")]
    out["metadata_packs"] = len(packs)
    out["metadata_bytes"] = sum((path / fmt.META_DIR / p).stat().st_size for p in packs)
    data = storage.listdir(fmt.DATA_DIR)
    out["data_files"] = len(data)
    out["data_bytes_allocated"] = sum(
        (path / fmt.DATA_DIR / d).stat().st_blocks * 512 for d in data
    )
    storage.close()
    return out
