"""The filesystems the conformance suite runs against: register a new one here.

A :class:`Subject` says whether it is writable and how to *prepare* it: given a
scratch directory and optionally a host tree to hold, make whatever storage the
filesystem needs and return a :class:`Prepared`, which can open the filesystem
object in-process and names the ``occlumfs mount`` arguments that serve the same
storage through FUSE. Every subject is then tested both ways; the host
directory oracle (``host``) is added by the suite itself.

``prepare`` runs once per subject and tree; the in-process object and the
mount it describes are then used *at the same time*, so a filesystem that
locks its storage must give each its own copy (as ``prepare_sefs`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conftest import run_cli

from occlumfs.fs import ROOT_INO, Filesystem
from occlumfs.keys import load_key_file
from occlumfs.memfs import MemFS
from occlumfs.treecopy import copy_tree_into


@dataclass(frozen=True)
class Prepared:
    open_fs: Callable[[], Filesystem]  # a filesystem object over the prepared storage
    mount_args: list[str]  # `occlumfs mount` arguments: SOURCE, then options
    # Problems found in the storage once the suite is done with it and every
    # object and mount over it is closed (an fsck); empty when consistent.
    check: Callable[[], list[str]] | None = None


@dataclass(frozen=True)
class Subject:
    name: str
    writable: bool
    # prepare(scratch_dir, tree or None) -> Prepared. A read-only subject always
    # gets a tree; a writable one gets None when the tests start from empty.
    prepare: Callable[[Path, Path | None], Prepared]


# -- memfs: writable, in memory -------------------------------------------------


def prepare_memfs(scratch: Path, tree: Path | None) -> Prepared:
    def open_fs() -> Filesystem:
        fs = MemFS(name="memfs:conformance")
        if tree is not None:
            copy_tree_into(fs, ROOT_INO, tree)
        return fs

    # `occlumfs mount -t mem DIR` copies DIR in; a path that does not exist: empty.
    source = tree if tree is not None else scratch / "no-such-source"
    return Prepared(open_fs, [str(source), "--type", "mem"])


# -- merkle image layers: read-only ---------------------------------------------


def _prepare_image(scratch: Path, tree: Path | None, *, encrypted: bool) -> Prepared:
    from occlumfs.merkle import build_image, open_image_fs

    assert tree is not None, "an image layer is read-only: it needs a tree"
    key = key_file = None
    options: list[str] = []
    if encrypted:
        key_file = scratch / "image.key"
        run_cli("keygen", key_file)
        key = load_key_file(key_file)
        options = ["--key-file", str(key_file)]
    image = scratch / "layer.img"
    digest = build_image(tree, image, key=key)
    return Prepared(
        lambda: open_image_fs(image, digest=digest, key=key),
        [str(image), "--type", "image", "--digest", digest, *options],
    )


def prepare_image(scratch: Path, tree: Path | None) -> Prepared:
    return _prepare_image(scratch, tree, encrypted=False)


def prepare_encrypted_image(scratch: Path, tree: Path | None) -> Prepared:
    return _prepare_image(scratch, tree, encrypted=True)


# -- sefs: writable, encrypted -------------------------------------------------


def prepare_sefs(scratch: Path, tree: Path | None) -> Prepared:
    # Two copies of one SEFS (each with its own trusted state): the in-process
    # object and the mount may be opened at the same time, and SEFS locks its
    # directory for exclusive use.
    import shutil

    from occlumfs.keys import write_key_file
    from occlumfs.sefs import Credential, create_sefs, open_sefs_fs

    key_file = scratch / "sefs.key"
    key = write_key_file(key_file)
    obj_dir, obj_state = scratch / "sefs-object", scratch / "state-object"
    create_sefs(obj_dir, Credential(key=key), state_dir=obj_state)
    if tree is not None:
        fs = open_sefs_fs(obj_dir, key=key, state_dir=obj_state)
        copy_tree_into(fs, ROOT_INO, tree)
        fs.close()
    fuse_dir, fuse_state = scratch / "sefs-fuse", scratch / "state-fuse"
    shutil.copytree(obj_dir, fuse_dir)
    shutil.copytree(obj_state, fuse_state)

    def check() -> list[str]:
        from occlumfs.sefs.fsck import fsck

        return [
            f"{where}: {problem}"
            for where, store, state in [
                ("object", obj_dir, obj_state),
                ("fuse", fuse_dir, fuse_state),
            ]
            for problem in fsck(store, key=key, state_dir=state)
        ]

    return Prepared(
        lambda: open_sefs_fs(obj_dir, key=key, state_dir=obj_state),
        [
            str(fuse_dir),
            "--type",
            "sefs",
            "--key-file",
            str(key_file),
            "--state-dir",
            str(fuse_state),
        ],
        check,
    )


# -- union: an image layer under a SEFS upper ---------------------------------------


def prepare_union(scratch: Path, tree: Path | None) -> Prepared:
    # The tree, when given, is the lower layer: the read tests read it through
    # the union, the write tests change it (copy-up, whiteouts, redirects).
    # Without one, the lower still holds a few entries so the root is merged.
    from occlumfs.keys import write_key_file
    from occlumfs.merkle import build_image
    from occlumfs.sefs import Credential, create_sefs
    from occlumfs.unionfs import Lower, open_union

    if tree is None:
        tree = scratch / "lower-tree"
        (tree / "lower-dir").mkdir(parents=True)
        (tree / "lower-file").write_bytes(b"from the lower layer\n")
    image = scratch / "layer.img"
    digest = build_image(tree, image)
    key_file = scratch / "upper.key"
    key = write_key_file(key_file)
    stores = {}
    for way in ("object", "fuse"):
        stores[way] = (scratch / f"upper-{way}", scratch / f"state-{way}")
        create_sefs(stores[way][0], Credential(key=key), state_dir=stores[way][1])

    def check() -> list[str]:
        from occlumfs.sefs.fsck import fsck

        return [
            f"{way} upper: {problem}"
            for way, (store, state) in stores.items()
            for problem in fsck(store, key=key, state_dir=state)
        ]

    upper, state = stores["object"]
    return Prepared(
        lambda: open_union([Lower(image, digest)], upper, key=key, state_dir=state),
        [
            str(stores["fuse"][0]),
            "--type",
            "union",
            "--lower",
            str(image),
            "--digest",
            digest,
            "--key-file",
            str(key_file),
            "--state-dir",
            str(stores["fuse"][1]),
        ],
        check,
    )


SUBJECTS: list[Subject] = [
    Subject("memfs", writable=True, prepare=prepare_memfs),
    Subject("sefs", writable=True, prepare=prepare_sefs),
    Subject("image", writable=False, prepare=prepare_image),
    Subject("image-encrypted", writable=False, prepare=prepare_encrypted_image),
    Subject("union", writable=True, prepare=prepare_union),
]
