"""Read-only, reproducible image layers verified by a Merkle tree (format: docs/formats/image.md).

The public API:

* :func:`build_image` turns a directory or a tar archive into an image and
  returns its digest (``sha256:<hex>``);
* :func:`open_image_fs` opens an image as a read-only :class:`~occlumfs.fs.Filesystem`
  that verifies every block lazily, on first read;
* :func:`is_image_file`, :func:`read_digest` (header only) and :func:`verify_image`
  (every block and record).
"""

from __future__ import annotations

import importlib

from occlumfs.errors import FormatError
from occlumfs.merkle.format import DESCRIPTOR_SIZE, MAGIC, Descriptor, digest_of

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing
if TYPE_CHECKING:
    from pathlib import Path

    from occlumfs.merkle.blocks import ImageReader
    from occlumfs.merkle.build import build_image
    from occlumfs.merkle.reader import ImageFS, open_image_fs
    from occlumfs.merkle.verify import verify_image

# Each public name is imported from its module on first use: `occlumfs mkimage`
# starts a fresh interpreter and need not load the reader, and a mount need not
# load the builder (start-up is a visible part of building a small tree).
_LAZY = {
    "ImageReader": "occlumfs.merkle.blocks",
    "build_image": "occlumfs.merkle.build",
    "ImageFS": "occlumfs.merkle.reader",
    "open_image_fs": "occlumfs.merkle.reader",
    "verify_image": "occlumfs.merkle.verify",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def is_image_file(path: Path) -> bool:
    """Whether ``path`` starts with the image magic (nothing else is checked)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_digest(image: Path) -> str:
    """The digest the image carries, from its header alone."""
    from pathlib import Path

    from occlumfs.merkle.blocks import read_header

    header, _ = read_header(Path(image))
    try:
        Descriptor.parse(header[:DESCRIPTOR_SIZE])
    except FormatError as exc:
        raise FormatError(f"{image}: {exc}") from None
    return digest_of(header[:DESCRIPTOR_SIZE])


__all__ = [
    "ImageFS",
    "ImageReader",
    "build_image",
    "is_image_file",
    "open_image_fs",
    "read_digest",
    "verify_image",
]
