"""Deterministic block sealing and header authentication for confidential images.

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

Sealing binds a block to its position, not to its image: from version 2 on,
the descriptor (which holds the root hash, hence every block) carries an
HMAC-SHA256 under its own subkey, so blocks spliced in from other images built
with the same key, with the tree and header recomputed, never open.

Subkeys come from HKDF-SHA256 over the 16-byte image key, one per purpose,
with readable ``info`` strings that name the format version. The key check
value lets a wrong key be told apart from tampering at open time; it reveals
nothing about the other subkeys.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from occlumfs.keys import hkdf_sha256
from occlumfs.merkle.format import BLOCK_SIZE, SEAL_SIZE, VERSION

NONCE_SIZE = 12
TAG_SIZE = 16
_BLOCK_AD = struct.Struct("<14sQ")
_AD_PREFIX = b"occlumfs block"
_SEAL_PAD = bytes(SEAL_SIZE - NONCE_SIZE - TAG_SIZE)


def _subkey(key: bytes, version: int, purpose: str) -> bytes:
    prefix = f"occlumfs image v{version}"
    return hkdf_sha256(key, prefix.encode(), f"{prefix} {purpose}")


class ImageKeys:
    """The subkeys of one image key for one format version, and the cipher built once."""

    __slots__ = ("_aead", "_header_key", "_nonce_key", "key_check")

    def __init__(self, key: bytes, version: int = VERSION) -> None:
        if len(key) != 16:
            raise ValueError("an image key has 16 bytes")
        self.key_check = _subkey(key, version, "key check value")
        self._nonce_key = _subkey(key, version, "block nonce")
        self._aead = AESGCM(_subkey(key, version, "block encryption"))
        # Version 1 has no header MAC; nothing in it is authenticated by the key.
        self._header_key = _subkey(key, version, "header authentication") if version >= 2 else None

    def matches(self, key_check: bytes) -> bool:
        return hmac.compare_digest(self.key_check, key_check)

    def header_mac(self, descriptor: bytes) -> bytes:
        """HMAC-SHA256 of the packed descriptor under the header subkey."""
        if self._header_key is None:
            raise ValueError("format version 1 has no header MAC")
        return hmac.digest(self._header_key, descriptor, "sha256")

    def header_mac_matches(self, descriptor: bytes, mac: bytes) -> bool:
        return hmac.compare_digest(self.header_mac(descriptor), mac)

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
        plain, bad = self.open_run(block_no, ciphertext, seal)
        return None if bad is not None else plain

    def open_run(
        self, first: int, ciphertext: bytes | memoryview, seals: bytes | memoryview
    ) -> tuple[bytes, int | None]:
        """Decrypt consecutive 4 KiB blocks from absolute block ``first`` with their seals.

        (plaintext, None), or (b"", i) when the tag of block ``first + i`` does
        not verify (nothing of the run is returned then).
        """
        ct = memoryview(ciphertext)
        seals = bytes(seals)
        decrypt = self._aead.decrypt
        pack = _BLOCK_AD.pack
        out = []
        for i, at in enumerate(range(0, len(ct), BLOCK_SIZE)):
            seal_at = i * SEAL_SIZE
            nonce = seals[seal_at : seal_at + NONCE_SIZE]
            tag = seals[seal_at + NONCE_SIZE : seal_at + NONCE_SIZE + TAG_SIZE]
            try:
                out.append(
                    decrypt(
                        nonce,
                        b"".join((ct[at : at + BLOCK_SIZE], tag)),
                        pack(_AD_PREFIX, first + i),
                    )
                )
            except InvalidTag:
                return b"", i
        return (out[0] if len(out) == 1 else b"".join(out)), None
