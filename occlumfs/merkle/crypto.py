"""Deterministic block sealing for confidential images (format version 1).

An encrypted image must still be byte-reproducible for the same key and tree,
so no randomness may enter. Each sealed block (inode table, heap, data) is
encrypted with AES-256-GCM under a *synthetic* nonce::

    nonce = HMAC-SHA256(nonce_key, "occlumfs block" || block_no || SHA-256(plaintext))[:12]
    ct, tag = AES-256-GCM(enc_key, nonce, plaintext, aad = "occlumfs block" || block_no)

The nonce depends on the position and the whole plaintext, so two different
plaintexts never share a nonce (up to HMAC collisions), which is what GCM's
security needs; equal (position, plaintext) pairs give equal ciphertexts, which
is the only thing deterministic encryption leaks. The nonce and tag go to the
seal table; the Merkle tree covers the ciphertext and the seal table, so the
GCM tag's job is to make forgery impossible for anyone without the key even
when no digest is pinned. See docs/formats/image.md for the argument.

Subkeys come from HKDF-SHA256 over the 16-byte image key, one per purpose,
with readable ``info`` strings. The key check value lets a wrong key be told
apart from tampering at open time; it reveals nothing about the other subkeys.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from occlumfs.keys import hkdf_sha256
from occlumfs.merkle.format import SEAL_SIZE

NONCE_SIZE = 12
TAG_SIZE = 16
_SALT = b"occlumfs image v1"
_BLOCK_AD = struct.Struct("<14sQ")
_AD_PREFIX = b"occlumfs block"
_SEAL_PAD = bytes(SEAL_SIZE - NONCE_SIZE - TAG_SIZE)


def _subkey(key: bytes, info: str) -> bytes:
    return hkdf_sha256(key, _SALT, info)


class ImageKeys:
    """The subkeys of one image key and the cipher object built once from them."""

    __slots__ = ("_aead", "_nonce_key", "key_check")

    def __init__(self, key: bytes) -> None:
        if len(key) != 16:
            raise ValueError("an image key has 16 bytes")
        self.key_check = _subkey(key, "occlumfs image v1 key check value")
        self._nonce_key = _subkey(key, "occlumfs image v1 block nonce")
        self._aead = AESGCM(_subkey(key, "occlumfs image v1 block encryption"))

    def matches(self, key_check: bytes) -> bool:
        return hmac.compare_digest(self.key_check, key_check)

    def seal(
        self, block_no: int, plaintext: bytes, plain_hash: bytes | None = None
    ) -> tuple[bytes, bytes]:
        """Encrypt one 4 KiB block at absolute position ``block_no``: (ciphertext, seal entry)."""
        if plain_hash is None:
            plain_hash = hashlib.sha256(plaintext).digest()
        ad = _BLOCK_AD.pack(_AD_PREFIX, block_no)
        nonce = hmac.digest(self._nonce_key, ad + plain_hash, "sha256")[:NONCE_SIZE]
        sealed = self._aead.encrypt(nonce, plaintext, ad)
        return sealed[:-TAG_SIZE], nonce + sealed[-TAG_SIZE:] + _SEAL_PAD

    def open(
        self, block_no: int, ciphertext: bytes | memoryview, seal: bytes | memoryview
    ) -> bytes | None:
        """Decrypt one block; None if its tag does not verify."""
        nonce = bytes(seal[:NONCE_SIZE])
        try:
            return self._aead.decrypt(
                nonce,
                bytes(ciphertext) + bytes(seal[NONCE_SIZE : NONCE_SIZE + TAG_SIZE]),
                _BLOCK_AD.pack(_AD_PREFIX, block_no),
            )
        except InvalidTag:
            return None
