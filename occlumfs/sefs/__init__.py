"""SEFS: a writable encrypted filesystem on untrusted host storage.

Confidentiality, integrity and freshness of contents, names and structure
(docs/formats/sefs.md); crash consistent by copy-on-write commits. This module
is the library's front door: create, open, re-key and describe a SEFS
directory. The filesystem object lives in :mod:`occlumfs.sefs.fs`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from occlumfs.errors import FormatError, NotFoundError, OcclumfsError, UsageError
from occlumfs.sefs import format as fmt
from occlumfs.sefs.fs import SefsFS
from occlumfs.sefs.keys import (
    CONFIG_MAX,
    Credential,
    Keys,
    dump_config,
    new_config,
    parse_config,
    read_passphrase_file,
    unwrap_master,
    wrap_master,
)
from occlumfs.sefs.state import DirLock, TrustedState, pin_store, prepare_state_dir
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
    """Whether ``path`` looks like a SEFS directory (whatever its config turns out to be)."""
    return os.path.isdir(path) and os.path.lexists(Path(path) / fmt.CONFIG_NAME)


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


def _read_config(storage: DiskStorage) -> dict:
    where = storage.root
    try:
        raw = storage.dir.read_file(fmt.CONFIG_NAME, CONFIG_MAX + 1)
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
    keys = Keys(master, bytes.fromhex(config["fs_id"]), config["version"])
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
    if path.is_symlink():
        # A store is never opened through a symlink (DiskStorage refuses it),
        # so one made there could not be used.
        raise UsageError(f"{path}: is a symlink; name the directory it points to")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path}: exists and is not an empty directory")
    if not path.parent.is_dir():
        raise NotFoundError(f"{path.parent}: no such directory")
    state_dir = prepare_state_dir(state_dir, path)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        try:
            tmp.mkdir(mode=0o700)
        except OSError as exc:  # the scratch dir is ours: the user named the store
            raise OcclumfsError(f"{path}: cannot create the store: {exc.strerror}") from None
        (tmp / fmt.META_DIR).mkdir()
        (tmp / fmt.DATA_DIR).mkdir()
        storage = DiskStorage(tmp)
        try:
            config = format_storage(storage, cred, trusted_state_dir=state_dir, scrypt=scrypt)
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
    pin_store(state_dir, path, bytes.fromhex(config["fs_id"]), accept_new=True)
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
    accept_new_store: bool = False,
) -> SefsFS:
    """Open the SEFS at ``path`` for exclusive use (the lock is held until ``close``).

    ``accept_new_store`` trusts a store whose fs id differs from the one this
    machine last saw at ``path`` (the trusted state pins one per path).
    """
    path = Path(os.path.abspath(path))
    storage = DiskStorage(path)
    lock = None
    try:
        config = _read_config(storage)
        state_dir = prepare_state_dir(state_dir, path)
        cred = credential(key, passphrase_file, passphrase)
        master = unwrap_master(config, cred, str(path))
        keys = Keys(master, bytes.fromhex(config["fs_id"]), config["version"])
        pin_store(state_dir, path, keys.fs_id, accept_new=accept_new_store)
        lock = DirLock(storage.dir)
        lock.acquire(read_only=read_only)
        return SefsFS(
            storage,
            keys,
            name=f"sefs:{path}",
            read_only=read_only,
            trusted_state=TrustedState(state_dir, keys.fs_id, keys.state_mac),
            lock=lock,
            tolerant=tolerant,
        )
    except BaseException:
        storage.close()
        if lock is not None:
            lock.release()
        raise


def change_credential(path: Path, old: Credential, new: Credential, scrypt: dict | None = None):
    """Re-wrap the master key under ``new``; no data is touched."""
    path = Path(os.path.abspath(path))
    storage = DiskStorage(path)
    lock = DirLock(storage.dir)
    try:
        config = _read_config(storage)
        master = unwrap_master(config, old, str(path))
        lock.acquire()
        config["wrap"] = wrap_master(master, config, new, scrypt)
        storage.replace(fmt.CONFIG_NAME, dump_config(config), f"{fmt.CONFIG_NAME}.tmp")
    finally:
        storage.close()
        lock.release()


def describe_sefs(path: Path) -> dict:
    """The public facts about a SEFS directory, readable without a key (never secrets).

    The config is checked field by field but not authenticated (that needs the key).
    """
    path = Path(os.path.abspath(path))
    storage = DiskStorage(path)
    try:
        config = _read_config(storage)
        wrap = config["wrap"]
        out: dict = {
            "path": str(path),
            "format": config["format"],
            "version": config["version"],
            "fs_id": config["fs_id"],
            "block_size": config["block_size"],
            "cipher": config["cipher"],
            "key_kind": wrap["kind"],
        }
        if wrap["kind"] == "passphrase":
            out["scrypt"] = wrap["scrypt"]
        try:
            head = fmt.unpack_head(storage.read(fmt.HEAD_NAME))
            out["commit_counter"] = head.counter
            ref = head.root
            out["root"] = f"{fmt.pack_name(ref.pack)} ({ref.length} bytes), tag {ref.tag.hex()}"
        except (FileNotFoundError, FormatError) as exc:
            out["head"] = f"unreadable: {exc}"
        packs = [st for name, st in storage.entries(fmt.META_DIR) if name.endswith(".pack")]
        out["metadata_packs"] = len(packs)
        out["metadata_bytes"] = sum(st.st_size for st in packs)
        data = [st for _name, st in storage.entries(fmt.DATA_DIR)]
        out["data_files"] = len(data)
        out["data_bytes_allocated"] = sum(st.st_blocks * 512 for st in data)
    finally:
        storage.close()
    return out
