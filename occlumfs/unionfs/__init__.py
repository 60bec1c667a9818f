"""UnionFS: verified image layers under one encrypted writable layer (docs/unionfs.md).

The library's front door is :func:`open_union`, the call ``occlumfs mount
--type union`` and the LibOS both use. The filesystem object is
:class:`occlumfs.unionfs.fs.UnionFS`, which composes any contract objects.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from occlumfs.errors import UsageError
from occlumfs.fs import Filesystem
from occlumfs.unionfs.copyup import LayerMismatchError
from occlumfs.unionfs.fs import UnionFS

__all__ = [
    "LayerMismatchError",
    "Lower",
    "UnionFS",
    "lowers_from_options",
    "open_union",
    "open_union_request",
    "upper_is_new",
]


@dataclass(frozen=True)
class Lower:
    """A read-only image layer: its file, the digest to pin it to, its key if encrypted."""

    path: Path
    digest: str | None = None
    key: bytes | None = None


def upper_is_new(upper: Path) -> bool:
    """Whether ``upper`` is missing or an empty directory (``create=True`` makes a store there)."""
    upper = Path(upper)
    return not upper.exists() or (upper.is_dir() and not any(upper.iterdir()))


def open_union(
    lowers: Sequence[Lower],
    upper: Path,
    *,
    key: bytes | None = None,
    passphrase: bytes | None = None,
    passphrase_file: Path | None = None,
    state_dir: Path | None = None,
    read_only: bool = False,
    create: bool = False,
) -> UnionFS:
    """Open image layers ``lowers`` (bottom first) under the SEFS store ``upper``.

    With ``create`` a missing or empty ``upper`` becomes a new SEFS store under
    the credential given. The upper records the lowers' digests the first time
    and refuses other lowers afterwards (:class:`LayerMismatchError`).
    ``close()`` commits the upper and closes every layer.
    """
    from occlumfs.merkle import open_image_fs
    from occlumfs.sefs import create_sefs, credential, open_sefs_fs

    if not lowers:
        raise UsageError("a union needs at least one lower layer")
    upper = Path(os.path.abspath(upper))
    if create and upper_is_new(upper):
        if read_only:
            raise UsageError(f"{upper}: cannot create a new upper layer read-only")
        create_sefs(upper, credential(key, passphrase_file, passphrase), state_dir=state_dir)
    opened: list[Filesystem] = []
    try:
        for lower in lowers:
            opened.append(open_image_fs(Path(lower.path), digest=lower.digest, key=lower.key))
        upper_fs = open_sefs_fs(
            upper,
            key=key,
            passphrase=passphrase,
            passphrase_file=passphrase_file,
            read_only=read_only,
            state_dir=state_dir,
        )
        opened.append(upper_fs)
        return UnionFS(opened[:-1], upper_fs, name=f"union:{upper}", read_only=read_only)
    except BaseException:
        for fs in reversed(opened):
            fs.close()
        raise


def lowers_from_options(
    images: Sequence[Path], digests: Sequence[str], key_files: Sequence[Path]
) -> list[Lower]:
    """The lowers of ``--lower``/``--digest``/``--lower-key-file``, each in lower order.

    Digests: none, or one per lower. Key files: none, one for every lower, or
    one per lower.
    """
    from occlumfs.keys import load_key_file

    if not images:
        raise UsageError("a union needs at least one --lower image")
    if digests and len(digests) != len(images):
        raise UsageError(
            f"{len(digests)} --digest for {len(images)} --lower: give one per lower, in order"
        )
    if len(key_files) not in (0, 1, len(images)):
        raise UsageError(
            f"{len(key_files)} --lower-key-file for {len(images)} --lower: "
            "give one for all, or one per lower, in order"
        )
    keys = [load_key_file(k) for k in key_files]
    if len(keys) == 1:
        keys *= len(images)
    return [
        Lower(Path(image), digests[i] if digests else None, keys[i] if keys else None)
        for i, image in enumerate(images)
    ]


def open_union_request(req) -> UnionFS:
    """Open the union an :class:`occlumfs.open.OpenRequest` describes (``source``: the upper)."""
    for n, lower in enumerate(req.lowers):
        if lower.digest is None:
            req.warn(
                f"no digest pinned for lower {n} ({lower.path}): it is verified against the "
                "digest it carries, so nothing pins which image this is"
            )
    new = upper_is_new(req.source)
    fs = open_union(
        req.lowers,
        req.source,
        key=req.key,
        passphrase=req.passphrase,
        state_dir=req.state_dir,
        read_only=req.read_only,
        create=True,
    )
    if new:
        req.warn(f"{os.path.abspath(req.source)}: created a new SEFS store as the upper layer")
    return fs
