"""``occlumfs union rebase``: move an upper onto rebuilt lowers, keeping the user's data.

An upper is bound to the lowers it was made over (their digests are recorded
in it). Three of its records depend on those exact lowers:

* metadata-only copies read their data from a lower, by inode, bound to its
  digest: the data is copied into the upper first;
* copies of hard-linked lower files sit in the index under a number derived
  from the old lower inode: every name showing one gets an upper link to it,
  and the index goes;
* copied-up entries keep their origin's inode number, derived from the old
  lowers: the mark goes, and the entry shows its upper number (inode numbers
  change once, at the rebase).

What is path-based stays and applies to the new lowers as it did to the old:
whiteouts (deleted names stay deleted), opaque directories, and redirects
(a renamed image directory shows what the new lowers hold at its old path).
Then the new lowers' digests are recorded, last. Everything happens through
the union opened over the old lowers, in an order where each step leaves an
upper that still works over them: after a crash the upper is still bound to
the old lowers (at worst a hard-linked file's link count is one off until the
rebase is run again, which carries on where it stopped).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from occlumfs.errors import FSError
from occlumfs.fs import ROOT_INO, iter_dir
from occlumfs.unionfs import layers as L


def rebase_upper(union, new_digests: Sequence[str]) -> dict[str, int]:
    """Rebind ``union``'s upper to lowers ``new_digests`` (bottom first); counts of work done.

    ``union`` is open, writable, over the old lowers; it is closed on return.
    """
    counts = {"data_copied": 0, "links_placed": 0, "marks_dropped": 0}
    indexed = _index_entries(union)
    try:
        _materialize(union, union._nodes[ROOT_INO], counts, walk_lower_only=bool(indexed))
        _drop_index(union)
        counts["marks_dropped"] = _drop_marks(union, ROOT_INO)
        union.upper.setxattr(ROOT_INO, L.LOWERS_XATTR, L.pack_lowers(list(new_digests)))
    finally:
        union.close()
    return counts


def _index_entries(union) -> list[bytes]:
    private = union._upper_lookup(ROOT_INO, L.PRIVATE_DIR)
    index = private and union._upper_lookup(private.ino, L.INDEX_DIR)
    return [e.name for e in iter_dir(union.upper, index.ino)] if index else []


def _materialize(union, node, counts: dict[str, int], *, walk_lower_only: bool) -> None:
    """Copy in the data of every metadata-only copy under directory ``node``, and
    give every name of a hard-linked lower file's copy an upper link."""
    for entry in list(iter_dir(union, node.ino)):
        child = union._resolve(node, entry.name)
        if child.is_dir:
            if child.upper is not None or walk_lower_only:
                _materialize(union, child, counts, walk_lower_only=walk_lower_only)
            continue
        if child.upper is None:
            continue
        if child.lower is not None:
            union.copy_up_data(child)
            counts["data_copied"] += 1
        if child.indexed:
            parent_upper = union.upper_dir(node)
            if union._upper_lookup(parent_upper, entry.name) is None:
                union.place_name(child, parent_upper, entry.name)
                counts["links_placed"] += 1


def _drop_index(union) -> None:
    private = union._upper_lookup(ROOT_INO, L.PRIVATE_DIR)
    index = private and union._upper_lookup(private.ino, L.INDEX_DIR)
    if index:
        union._remove_upper_tree(index.ino)
        union.upper.rmdir(private.ino, L.INDEX_DIR)


def _drop_marks(union, dir_ino: int) -> int:
    """Remove the marks bound to the old lowers' inode numbers from every upper entry."""
    dropped = 0
    for entry in list(iter_dir(union.upper, dir_ino)):
        for name in (L.GONE_XATTR, L.ORIGIN_XATTR):  # GONE needs ORIGIN: first
            try:
                union.upper.removexattr(entry.attr.ino, name)
                dropped += 1
            except FSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        if entry.attr.is_dir:
            dropped += _drop_marks(union, entry.attr.ino)
    return dropped
