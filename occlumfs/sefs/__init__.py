"""SEFS: a writable encrypted filesystem on untrusted host storage (placeholder)."""

from pathlib import Path


def is_sefs_dir(path: Path) -> bool:
    return False


def open_sefs_fs(path: Path, **options):
    raise NotImplementedError
