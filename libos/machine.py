"""Secrets this machine keeps outside every instance: the machine secret and image keys.

The machine secret stands in for the CPU's sealing key: the SEFS autokey of
an instance is derived from it, the signer identity (mrsigner) and the
config's product id, as Occlum's MRSIGNER key policy derives its key. Copying
an instance to another machine, or re-signing it with another key, gives a
different autokey: the encrypted store does not open. Whoever is root on
this machine can read the secret (the enclave is simulated).

Image keys given to ``occlum build --image-key`` are kept here too, under a
keyed fingerprint, so that ``occlum run`` finds the key of the image it runs
without the key ever being written into the instance.
"""

from __future__ import annotations

import os
from pathlib import Path

from occlumfs.errors import NotFoundError, OcclumfsError
from occlumfs.hostio import HostDir
from occlumfs.keys import KEY_BYTES, format_key, hkdf_sha256, parse_key

SECRET_BYTES = 32


def state_dir() -> Path:
    """``$OCCLUM_STATE_DIR``, else /var/lib/occlumfs (root), else ~/.local/state/occlumfs."""
    env = os.environ.get("OCCLUM_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/occlumfs")
    return Path.home() / ".local" / "state" / "occlumfs"


def private_state_dir() -> Path:
    path = state_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return hkdf_sha256(ikm, salt, info, length)


def machine_secret() -> bytes:
    """This machine's secret, created (0600) on first use."""
    path = private_state_dir() / "machine-secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(SECRET_BYTES))
            f.flush()
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        secret = f.read(SECRET_BYTES + 1)
    if len(secret) != SECRET_BYTES:
        raise OcclumfsError(f"{path}: the machine secret is damaged ({len(secret)} bytes)")
    return secret


def autokey(mrsigner: str, product_id: int) -> bytes:
    """The SEFS key of an instance built without --image-key."""
    info = b"occlum sefs autokey v1 product_id=" + str(product_id).encode()
    return _hkdf(machine_secret(), bytes.fromhex(mrsigner), info)


def key_fingerprint(key: bytes) -> str:
    """A name for an image key that reveals nothing of it."""
    return _hkdf(key, b"", b"occlum image key fingerprint v1", 16).hex()


def remember_image_key(key: bytes) -> str:
    """Keep ``key`` under its fingerprint (0600); returns the fingerprint."""
    fingerprint = key_fingerprint(key)
    keys = private_state_dir() / "image-keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    path = keys / fingerprint
    if not path.exists():
        with HostDir.open(keys, follow=True) as where:
            where.replace_file(fingerprint, (format_key(key) + "\n").encode(), mode=0o600)
    return fingerprint


def recall_image_key(fingerprint: str) -> bytes:
    path = state_dir() / "image-keys" / fingerprint
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFoundError(
            "the image key this instance was built with is not on this machine; "
            "give it with --image-key"
        ) from None
    with os.fdopen(fd) as f:
        return parse_key(f.read(4096), str(path))
