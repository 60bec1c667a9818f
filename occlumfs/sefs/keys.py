"""The SEFS key hierarchy and ``sefs.json``: a random master key, wrapped by a key or passphrase.

``sefs.json`` holds the wrapped master key and how to derive the key that
unwraps it (docs/formats/sefs.md, "Keys"). Changing the passphrase re-wraps the
master key; the data, encrypted under subkeys of the master key, is untouched.

Every field of the config is authenticated: from version 2 the whole canonical
config (all but the wrap's nonce and ciphertext) is the key wrap's associated
data, so an edited field makes the unwrap fail. Version 1 bound only the fs id
and the key kind; its other fields are accepted only with the one value
version 1 ever wrote. Unknown keys and values are refused in both.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from occlumfs.errors import FormatError, UsageError, WrongKeyError
from occlumfs.hostio import read_named_file
from occlumfs.keys import hkdf_sha256
from occlumfs.sefs.format import BLOCK_SIZE, FS_ID_SIZE

FORMAT_NAME = "occlumfs-sefs"
CONFIG_VERSION = 4  # what `create` writes
CONFIG_VERSIONS = (1, 2, 3, 4)  # what this build reads
LOG_VERSION = 3  # the first version with a write-ahead log (docs/formats/sefs.md, "The log")
INLINE_VERSION = 4  # the first version with small files' data inline (occlumfs.sefs.inline)
CONFIG_MAX = 64 * 1024  # bytes; a larger sefs.json is malformed
CIPHER = "AES-256-GCM"
KIND_KEY_FILE = "key-file"
KIND_PASSPHRASE = "passphrase"
SCRYPT_DEFAULT = {"n": 1 << 15, "r": 8, "p": 1}  # 32 MiB
SCRYPT_MAX_MEMORY = 256 << 20  # bytes scrypt may allocate for a config we did not write
SCRYPT_MAX_WORK = 1 << 30  # memory * p: about 5 s of one core
_WRAP_AD_V1 = b"occlumfs-sefs v1 master key"
_WRAP_AD_V2 = b"occlumfs-sefs v2 config\0"
_KEY_FILE_INFO = b"occlumfs-sefs v1 key-file KEK"
_SALT_SIZE, _NONCE_SIZE, _WRAPPED_SIZE = 16, 12, 32 + 16
_CONFIG_KEYS = {"format", "version", "fs_id", "block_size", "cipher", "wrap"}
_WRAP_KEYS = {"kind", "salt", "nonce", "wrapped_key"}
_SCRYPT_KEYS = {"n", "r", "p"}


@dataclass(frozen=True)
class Credential:
    """What the user holds: a 16-byte key file's key, or a passphrase."""

    key: bytes | None = None
    passphrase: bytes | None = None

    @property
    def kind(self) -> str:
        return KIND_KEY_FILE if self.key is not None else KIND_PASSPHRASE


def read_passphrase_file(path: Path) -> bytes:
    text = read_named_file(path, "passphrase file")
    line = text.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise UsageError(f"{path}: the passphrase file's first line is empty")
    return line


def _kek(cred: Credential, wrap: dict, where: str = "SEFS") -> bytes:
    salt = bytes.fromhex(wrap["salt"])
    if wrap["kind"] == KIND_KEY_FILE:
        if cred.key is None:
            raise WrongKeyError(f"{where}: wrong key: this filesystem is opened with a key file")
        return hkdf_sha256(cred.key, salt, _KEY_FILE_INFO)
    if cred.passphrase is None:
        raise WrongKeyError(f"{where}: wrong key: this filesystem is opened with a passphrase")
    costs = wrap["scrypt"]
    return Scrypt(salt=salt, length=32, n=costs["n"], r=costs["r"], p=costs["p"]).derive(
        cred.passphrase
    )


def _wrap_ad(config: dict) -> bytes:
    """The key wrap's associated data: (version 2) every field but the wrap's own output."""
    wrap = config["wrap"]
    if config["version"] == 1:
        return _WRAP_AD_V1 + bytes.fromhex(config["fs_id"]) + wrap["kind"].encode()
    bound = {**config, "wrap": {k: v for k, v in wrap.items() if k not in ("nonce", "wrapped_key")}}
    return _WRAP_AD_V2 + json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()


def wrap_master(master: bytes, config: dict, cred: Credential, scrypt: dict | None = None) -> dict:
    """A new ``wrap`` for ``config`` (whose other fields it binds) under ``cred``."""
    wrap = {"kind": cred.kind, "salt": secrets.token_hex(_SALT_SIZE)}
    if cred.kind == KIND_PASSPHRASE:
        wrap["scrypt"] = dict(scrypt or SCRYPT_DEFAULT)
    nonce = os.urandom(_NONCE_SIZE)
    ad = _wrap_ad({**config, "wrap": wrap})
    wrap["nonce"] = nonce.hex()
    wrap["wrapped_key"] = AESGCM(_kek(cred, wrap)).encrypt(nonce, master, ad).hex()
    return wrap


def unwrap_master(config: dict, cred: Credential, where: str) -> bytes:
    """The master key, or WrongKeyError naming ``where`` (the SEFS directory).

    AES-GCM cannot tell a wrong key from an edited config: both are "wrong key".
    """
    wrap = config["wrap"]
    try:
        return AESGCM(_kek(cred, wrap, where)).decrypt(
            bytes.fromhex(wrap["nonce"]), bytes.fromhex(wrap["wrapped_key"]), _wrap_ad(config)
        )
    except InvalidTag:
        raise WrongKeyError(f"{where}: wrong key") from None


def new_config(cred: Credential, scrypt: dict | None = None) -> tuple[dict, bytes]:
    """A fresh config and its master key."""
    master = secrets.token_bytes(32)
    config = {
        "format": FORMAT_NAME,
        "version": CONFIG_VERSION,
        "fs_id": secrets.token_bytes(FS_ID_SIZE).hex(),
        "block_size": BLOCK_SIZE,
        "cipher": CIPHER,
    }
    config["wrap"] = wrap_master(master, config, cred, scrypt)
    return config, master


def _int(value: object, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _hex(value: object, size: int) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 2 * size
        and all(c in "0123456789abcdef" for c in value)
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _config_problem(config: object) -> str | None:
    """What is wrong with a decoded config, or None. Only known keys and values pass."""
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        return "not a SEFS config"
    version = config.get("version")
    if type(version) is not int or version not in CONFIG_VERSIONS:
        versions = " and ".join(map(str, CONFIG_VERSIONS))
        return f"format version {_short(version)} is not supported (this build reads {versions})"
    if set(config) != _CONFIG_KEYS:
        return f"expected the keys {sorted(_CONFIG_KEYS)}, found {sorted(map(str, config))[:8]}"
    if not _hex(config["fs_id"], FS_ID_SIZE):
        return f"fs_id {_short(config['fs_id'])} is not {FS_ID_SIZE} bytes of lowercase hex"
    if config["block_size"] != BLOCK_SIZE or type(config["block_size"]) is not int:
        return f"block_size {_short(config['block_size'])} is not supported (only {BLOCK_SIZE})"
    if config["cipher"] != CIPHER:
        return f"cipher {_short(config['cipher'])} is not supported (only {CIPHER})"
    wrap = config["wrap"]
    if not isinstance(wrap, dict) or wrap.get("kind") not in (KIND_KEY_FILE, KIND_PASSPHRASE):
        return "wrap.kind is neither 'key-file' nor 'passphrase'"
    want = _WRAP_KEYS | ({"scrypt"} if wrap["kind"] == KIND_PASSPHRASE else set())
    if set(wrap) != want:
        return f"wrap: expected the keys {sorted(want)}, found {sorted(map(str, wrap))[:8]}"
    for name, size in (
        ("salt", _SALT_SIZE),
        ("nonce", _NONCE_SIZE),
        ("wrapped_key", _WRAPPED_SIZE),
    ):
        if not _hex(wrap[name], size):
            return f"wrap.{name} is not {size} bytes of lowercase hex"
    if wrap["kind"] == KIND_PASSPHRASE:
        costs = wrap["scrypt"]
        if not isinstance(costs, dict) or set(costs) != _SCRYPT_KEYS:
            return "wrap.scrypt: expected the keys n, r and p"
        n, r, p = costs["n"], costs["r"], costs["p"]
        # Bounded so a crafted config cannot make us allocate gigabytes (scrypt
        # needs 128 * n * r bytes) or spin for minutes.
        if not (_int(n, 2, 1 << 22) and n & (n - 1) == 0 and _int(r, 1, 32) and _int(p, 1, 16)):
            return "wrap.scrypt: costs out of range"
        if 128 * n * r > SCRYPT_MAX_MEMORY or 128 * n * r * p > SCRYPT_MAX_WORK:
            return "wrap.scrypt: costs too high (128 n r at most 256 MiB, times p 1 GiB)"
    return None


def parse_config(raw: bytes, where: str) -> dict:
    """The config in ``raw``, every key and value checked; FormatError naming ``where``."""
    if len(raw) > CONFIG_MAX:
        raise FormatError(f"{where}: malformed SEFS config (over {CONFIG_MAX} bytes)")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise FormatError(f"{where}: malformed SEFS config (not JSON)") from None
    problem = _config_problem(config)
    if problem is not None:
        raise FormatError(f"{where}: malformed SEFS config ({problem})")
    return config


def dump_config(config: dict) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


class Keys:
    """The per-purpose subkeys of one filesystem, cipher objects built once."""

    def __init__(self, master: bytes, fs_id: bytes, version: int = CONFIG_VERSION) -> None:
        self.fs_id = fs_id
        self.version = version  # the config's: whether the store has a log

        def sub(purpose: str) -> bytes:
            return hkdf_sha256(master, fs_id, f"occlumfs-sefs v1 {purpose}")

        self.data = AESGCM(sub("data blocks"))
        self.meta = AESGCM(sub("metadata"))
        self.head_mac = sub("head mac")
        self.state_mac = sub("trusted state mac")
        self.log = AESGCM(hkdf_sha256(master, fs_id, "occlumfs-sefs v3 log"))
