"""Signing keys and the signed manifest (the simulated enclave's signature).

A signing key is an Ed25519 or RSA-3072 private key in PEM (PKCS#8 or the
traditional RSA form, unencrypted). The signature covers a domain-separated
copy of the manifest bytes; the signature file carries the public key, so
``mrsigner`` (SHA-256 of the public key's DER SubjectPublicKeyInfo, as
SGX's MRSIGNER is a hash of the signer's modulus) can be checked without
the private key. ``mrenclave`` is the SHA-256 of the manifest bytes: the
runtime config, the layer digests and the libos version.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from occlumfs.errors import FormatError, IntegrityError
from occlumfs.hostio import read_named_file

SIGNED_CONTEXT = b"occlum manifest signature v1\0"
RSA_BITS = 3072


def load_sign_key(path: Path):
    """The private key in ``path``: Ed25519 or RSA-3072, else one line saying why not."""
    data = read_named_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise FormatError(
            f"{path}: not an unencrypted PEM private key (Ed25519 or RSA-3072)"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size != RSA_BITS:
            raise FormatError(f"{path}: an RSA signing key has {RSA_BITS} bits, not {key.key_size}")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise FormatError(f"{path}: unsupported key type (use Ed25519 or RSA-3072)")
    return key


def generate_dev_key(path: Path) -> None:
    """A fresh Ed25519 key in ``path`` (mode 0600), never replacing one."""
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def mrsigner_of(public_key) -> str:
    return hashlib.sha256(_public_der(public_key)).hexdigest()


def mrenclave_of(manifest: bytes) -> str:
    return hashlib.sha256(manifest).hexdigest()


def sign_manifest(key, manifest: bytes) -> bytes:
    """The signature file's bytes for ``manifest``."""
    message = SIGNED_CONTEXT + manifest
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm = "rsa-3072-pss-sha256"
        sig = key.sign(
            message,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            hashes.SHA256(),
        )
    else:
        algorithm = "ed25519"
        sig = key.sign(message)
    public = key.public_key()
    body = {
        "algorithm": algorithm,
        "public_key": base64.b64encode(_public_der(public)).decode(),
        "mrenclave": mrenclave_of(manifest),
        "signature": base64.b64encode(sig).decode(),
    }
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Signature:
    mrsigner: str
    mrenclave: str


def verify_manifest(manifest: bytes, signature_file: bytes, where: str) -> Signature:
    """Check ``signature_file`` over ``manifest``; IntegrityError naming what failed."""
    try:
        body = json.loads(signature_file)
        algorithm = body["algorithm"]
        der = base64.b64decode(body["public_key"], validate=True)
        sig = base64.b64decode(body["signature"], validate=True)
        claimed = body["mrenclave"]
        public = serialization.load_der_public_key(der)
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{where}: the signature file is malformed") from None
    if not isinstance(claimed, str) or claimed != mrenclave_of(manifest):
        raise IntegrityError(f"{where}: measurement mismatch: the manifest is not the one signed")
    message = SIGNED_CONTEXT + manifest
    try:
        if algorithm == "ed25519" and isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(sig, message)
        elif (
            algorithm == "rsa-3072-pss-sha256"
            and isinstance(public, rsa.RSAPublicKey)
            and public.key_size == RSA_BITS
        ):
            public.verify(
                sig,
                message,
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                hashes.SHA256(),
            )
        else:
            raise IntegrityError(f"{where}: unsupported signature algorithm {algorithm!r}")
    except InvalidSignature:
        raise IntegrityError(
            f"{where}: bad signature: the manifest was not signed by this key"
        ) from None
    return Signature(mrsigner_of(public), claimed)
