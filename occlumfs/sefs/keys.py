"""The SEFS key hierarchy: a random master key, wrapped by a key file or a passphrase.

``sefs.json`` holds the wrapped master key and how to derive the key that
unwraps it (docs/formats/sefs.md, "Keys"). Changing the passphrase re-wraps the
master key; the data, encrypted under subkeys of the master key, is untouched.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from occlumfs.errors import FormatError, OcclumfsError, UsageError, WrongKeyError
from occlumfs.sefs.format import FS_ID_SIZE, VERSION, check_version

FORMAT_NAME = "occlumfs-sefs"
KIND_KEY_FILE = "key-file"
KIND_PASSPHRASE = "passphrase"
SCRYPT_DEFAULT = {"n": 1 << 15, "r": 8, "p": 1}
_WRAP_AD = b"occlumfs-sefs v1 master key"
_KEY_FILE_INFO = b"occlumfs-sefs v1 key-file KEK"


@dataclass(frozen=True)
class Credential:
    """What the user holds: a 16-byte key file's key, or a passphrase."""

    key: bytes | None = None
    passphrase: bytes | None = None

    @property
    def kind(self) -> str:
        return KIND_KEY_FILE if self.key is not None else KIND_PASSPHRASE


def read_passphrase_file(path: Path) -> bytes:
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        from occlumfs.errors import NotFoundError

        raise NotFoundError(f"{path}: passphrase file not found") from None
    except OSError as exc:
        raise OcclumfsError(f"{path}: cannot read the passphrase file: {exc.strerror}") from None
    line = text.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise UsageError(f"{path}: the passphrase file's first line is empty")
    return line


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _kek(cred: Credential, wrap: dict, where: str = "SEFS") -> bytes:
    salt = bytes.fromhex(wrap["salt"])
    if wrap["kind"] == KIND_KEY_FILE:
        if cred.key is None:
            raise WrongKeyError(f"{where}: wrong key: this filesystem is opened with a key file")
        return _hkdf(cred.key, salt, _KEY_FILE_INFO)
    if cred.passphrase is None:
        raise WrongKeyError(f"{where}: wrong key: this filesystem is opened with a passphrase")
    costs = wrap["scrypt"]
    return Scrypt(salt=salt, length=32, n=costs["n"], r=costs["r"], p=costs["p"]).derive(
        cred.passphrase
    )


def wrap_master(master: bytes, fs_id: bytes, cred: Credential, scrypt: dict | None = None) -> dict:
    wrap = {"kind": cred.kind, "salt": secrets.token_hex(16)}
    if cred.kind == KIND_PASSPHRASE:
        wrap["scrypt"] = dict(scrypt or SCRYPT_DEFAULT)
    nonce = os.urandom(12)
    ad = _WRAP_AD + fs_id + cred.kind.encode()
    wrap["nonce"] = nonce.hex()
    wrap["wrapped_key"] = AESGCM(_kek(cred, wrap)).encrypt(nonce, master, ad).hex()
    return wrap


def unwrap_master(config: dict, cred: Credential, where: str) -> bytes:
    """The master key, or WrongKeyError naming ``where`` (the SEFS directory)."""
    wrap = config["wrap"]
    fs_id = bytes.fromhex(config["fs_id"])
    ad = _WRAP_AD + fs_id + wrap["kind"].encode()
    try:
        return AESGCM(_kek(cred, wrap, where)).decrypt(
            bytes.fromhex(wrap["nonce"]), bytes.fromhex(wrap["wrapped_key"]), ad
        )
    except InvalidTag:
        raise WrongKeyError(f"{where}: wrong key") from None


def new_config(cred: Credential, scrypt: dict | None = None) -> tuple[dict, bytes]:
    """A fresh config and its master key."""
    fs_id = secrets.token_bytes(FS_ID_SIZE)
    master = secrets.token_bytes(32)
    config = {
        "format": FORMAT_NAME,
        "version": VERSION,
        "fs_id": fs_id.hex(),
        "block_size": 4096,
        "cipher": "AES-256-GCM",
        "wrap": wrap_master(master, fs_id, cred, scrypt),
    }
    return config, master


def parse_config(raw: bytes, where: str) -> dict:
    try:
        config = json.loads(raw)
        if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
            raise ValueError("not a SEFS config")
        check_version(config.get("version"))
        fs_id = bytes.fromhex(config["fs_id"])
        wrap = config["wrap"]
        if len(fs_id) != FS_ID_SIZE or wrap["kind"] not in (KIND_KEY_FILE, KIND_PASSPHRASE):
            raise ValueError("bad fs_id or key kind")
        for name in ("salt", "nonce", "wrapped_key"):
            bytes.fromhex(wrap[name])
        if wrap["kind"] == KIND_PASSPHRASE:
            costs = wrap["scrypt"]
            n, r, p = costs["n"], costs["r"], costs["p"]
            # Bounded so a crafted config cannot make us allocate gigabytes.
            if not (2 <= n <= 1 << 22 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
                raise ValueError("scrypt costs out of range")
    except FormatError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{where}: malformed SEFS config ({exc})") from None
    return config


def dump_config(config: dict) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


class Keys:
    """The per-purpose subkeys of one filesystem, cipher objects built once."""

    def __init__(self, master: bytes, fs_id: bytes) -> None:
        self.fs_id = fs_id

        def sub(purpose: str) -> bytes:
            return _hkdf(master, fs_id, f"occlumfs-sefs v1 {purpose}".encode())

        self.data = AESGCM(sub("data blocks"))
        self.meta = AESGCM(sub("metadata"))
        self.head_mac = sub("head mac")
        self.state_mac = sub("trusted state mac")
