"""Read-only, reproducible image layers verified by a Merkle tree (placeholder)."""

from pathlib import Path


def is_image_file(path: Path) -> bool:
    return False


def open_image_fs(path: Path, *, digest: str | None, key: bytes | None):
    raise NotImplementedError
