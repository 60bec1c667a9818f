"""Open a filesystem of a given kind with the keys given: the one factory.

The ``occlumfs mount`` command, the union and the ``occlum`` tooling all turn
"this source, of this kind, with these secrets" into a
:class:`~occlumfs.fs.Filesystem` here. The factory never prompts and never
prints: a secret it needs is the caller's to ask for (see :func:`needs_secret`),
and advice for the user goes to the ``warn`` callback (default: the logging
module).

Each kind is one entry in :data:`KINDS`: how to recognise a source of that
kind (optional), whether it needs a key or passphrase, and how to open it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from occlumfs.errors import NotFoundError, UsageError
from occlumfs.fs import Filesystem

log = logging.getLogger("occlumfs.open")


@dataclass(frozen=True)
class OpenRequest:
    """What the caller asked for; each kind uses the fields it understands."""

    source: Path
    digest: str | None = None
    key: bytes | None = None
    passphrase: bytes | None = None
    read_only: bool = False
    state_dir: Path | None = None
    # Trust a SEFS whose id differs from the one last seen at its path.
    accept_new_store: bool = False
    warn: Callable[[str], None] = log.warning
    # A union: its read-only layers, bottom first (occlumfs.unionfs.Lower); the
    # source is the upper.
    lowers: tuple = ()


@dataclass(frozen=True)
class Kind:
    """One kind of filesystem the factory can open."""

    open: Callable[[OpenRequest], Filesystem]
    # Whether a source looks like this kind; None: never detected, only named.
    detect: Callable[[Path], bool] | None = None
    # Whether opening needs a key or passphrase (the caller may prompt for it).
    needs_secret: bool = False
    # Whether the source must exist before opening.
    source_must_exist: bool = True


def _open_image(req: OpenRequest) -> Filesystem:
    from occlumfs.merkle import open_image_fs

    if req.passphrase is not None:
        raise UsageError(f"{req.source}: an image is opened with a key file, not a passphrase")
    fs = open_image_fs(req.source, digest=req.digest, key=req.key)
    warning = fs.unpinned_warning()  # None when pinned; says what an unpinned image risks
    if warning is not None:
        req.warn(warning)
    return fs


def _open_sefs(req: OpenRequest) -> Filesystem:
    from occlumfs.sefs import open_sefs_fs

    given = [s for s in (req.key, req.passphrase) if s is not None]
    if len(given) != 1:
        what = "both a key and a passphrase" if given else "no key or passphrase"
        raise UsageError(f"{req.source}: a SEFS opens with one key or passphrase; {what} given")
    return open_sefs_fs(
        req.source,
        key=req.key,
        passphrase=req.passphrase,
        read_only=req.read_only,
        state_dir=req.state_dir,
        accept_new_store=req.accept_new_store,
    )


def _open_mem(req: OpenRequest) -> Filesystem:
    from occlumfs.fs import ROOT_INO
    from occlumfs.memfs import MemFS
    from occlumfs.treecopy import copy_tree_into

    fs = MemFS(name=f"memfs:{req.source}")
    if req.source.is_dir():
        copy_tree_into(fs, ROOT_INO, req.source)
    elif req.source.exists():
        raise UsageError(f"{req.source}: a memory filesystem starts from a directory, or empty")
    return fs


def _open_union(req: OpenRequest) -> Filesystem:
    from occlumfs.unionfs import open_union_request

    return open_union_request(req)


def _is_sefs(source: Path) -> bool:
    from occlumfs.sefs import is_sefs_dir

    return source.is_dir() and is_sefs_dir(source)


def _is_image(source: Path) -> bool:
    from occlumfs.merkle import is_image_file

    return source.is_file() and is_image_file(source)


# The kinds, in the order detection tries them. Add a kind with one entry here.
KINDS: dict[str, Kind] = {
    "image": Kind(_open_image, detect=_is_image),
    "sefs": Kind(_open_sefs, detect=_is_sefs, needs_secret=True),
    "mem": Kind(_open_mem, source_must_exist=False),
    "union": Kind(_open_union, needs_secret=True, source_must_exist=False),
}


def _kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise UsageError(f"unknown filesystem type {name!r}; one of {', '.join(KINDS)}") from None


def detect_type(source: Path) -> str:
    """The kind of filesystem at ``source``, or a UsageError when none matches."""
    source = Path(source)
    for name, kind in KINDS.items():
        if kind.detect is not None and kind.detect(source):
            return name
    detectable = [name for name, kind in KINDS.items() if kind.detect is not None]
    raise UsageError(f"{source}: not a filesystem of any known type ({', '.join(detectable)})")


def resolve_kind(kind: str | None, source: Path) -> str:
    """The kind to open ``source`` as (detected when None), once its source is there."""
    source = Path(source)
    if (kind is None or _kind(kind).source_must_exist) and not source.exists():
        raise NotFoundError(f"{source} does not exist")
    return detect_type(source) if kind is None else kind


def needs_secret(kind: str) -> bool:
    """Whether opening ``kind`` needs a key or a passphrase."""
    return _kind(kind).needs_secret


def open_filesystem(
    kind: str | None,
    source: Path,
    *,
    digest: str | None = None,
    key: bytes | None = None,
    passphrase: bytes | None = None,
    read_only: bool = False,
    state_dir: Path | None = None,
    accept_new_store: bool = False,
    warn: Callable[[str], None] = log.warning,
    lowers: tuple = (),
) -> Filesystem:
    """Open ``source`` as a filesystem of ``kind`` (detected when None).

    ``warn`` receives advice for the user (an image opened without a pinned
    digest, for one); the factory never prints or prompts.
    """
    source = Path(source)
    kind = resolve_kind(kind, source)
    request = OpenRequest(
        source=source,
        digest=digest,
        key=key,
        passphrase=passphrase,
        read_only=read_only,
        state_dir=state_dir,
        accept_new_store=accept_new_store,
        warn=warn,
        lowers=tuple(lowers),
    )
    return KINDS[kind].open(request)
