"""The user's data survives an image rebuild: which build a store is bound to, and the move.

A store (the union's upper in ``run/``) is bound to the digests of the layers
it was made over; the union records them inside the store, encrypted, and
refuses other layers. Beside the store, ``__ROOT.lowers`` repeats them in
plain text: a host-writable guard that only says early which layers to look
for (the union's record stays the authority).

When ``occlum build`` replaces the layer a store is bound to, it keeps that
layer under ``build/mount/__ROOT/previous/`` (listed in
``build/previous-layers.json``). The next ``occlum run`` opens the union over
the previous layer (the union checks its digest against its own record),
moves the store onto the new build (:func:`occlumfs.unionfs.rebase.rebase_upper`:
data still read from the old layer is copied in, deletions and renames carry
over by path), then drops the previous layer. Occlum itself loses the data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from libos.instance import Instance, write_atomic

PREVIOUS_DIR = "previous"
PREVIOUS_LIST = "previous-layers.json"


def _guard(upper: Path) -> Path:
    return upper.parent / (upper.name + ".lowers")


def store_digests(upper: Path) -> list[str] | None:
    """The digests the store says it was made over (None: no store, or no guard)."""
    from occlumfs.unionfs import upper_is_new

    if upper_is_new(upper):
        return None
    try:
        return _guard(upper).read_text().split()
    except FileNotFoundError:
        return None


def record_store_digests(upper: Path, digests: list[str]) -> None:
    write_atomic(_guard(upper), ("\n".join(digests) + "\n").encode())


def _previous_list(instance: Instance) -> Path:
    return instance.build / PREVIOUS_LIST


def keep_previous_layer(instance: Instance, key_id: str | None) -> None:
    """Before the layer is rebuilt: keep it when the store is bound to it."""
    from occlumfs.errors import OcclumfsError
    from occlumfs.merkle import read_digest

    bound = store_digests(instance.upper)
    if not bound or not instance.layer.exists():
        return
    try:
        digest = read_digest(instance.layer)
    except OcclumfsError:
        return
    if bound != [digest]:
        return
    keep = instance.layer.parent / PREVIOUS_DIR / f"{digest.split(':', 1)[-1][:32]}.layer"
    keep.parent.mkdir(exist_ok=True)
    os.replace(instance.layer, keep)
    entry = {"path": str(keep.relative_to(instance.build)), "digest": digest, "image_key": key_id}
    _write_list(instance, [entry])


def _write_list(instance: Instance, entries: list[dict]) -> None:
    write_atomic(_previous_list(instance), json.dumps(entries, indent=2).encode())


def _previous_layers(instance: Instance, digests: list[str]):
    """The kept layers with these digests, as union lowers; None when not all are here."""
    from libos import machine
    from occlumfs.unionfs import Lower

    try:
        entries = json.loads(_previous_list(instance).read_text())
        by_digest = {e["digest"]: e for e in entries}
        chosen = [by_digest[d] for d in digests]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    lowers = []
    for entry in chosen:
        path = (instance.build / entry["path"]).resolve()
        if instance.build.resolve() not in path.parents or not path.is_file():
            return None
        key = machine.recall_image_key(entry["image_key"]) if entry.get("image_key") else None
        lowers.append(Lower(path, entry["digest"], key))
    return lowers


def rebase_store(build, state_dir: Path) -> dict[str, int] | None:
    """Move the store onto ``build`` when it is bound to a kept previous build.

    Returns the work done, or None when there was nothing to move (or nothing
    to move it from: opening the union then refuses in one line).
    """
    from occlumfs.unionfs import open_union
    from occlumfs.unionfs.rebase import rebase_upper

    instance = build.instance
    new = [digest for _path, digest, _key in build.layers]
    bound = store_digests(instance.upper)
    if bound is None or bound == new:
        return None
    old = _previous_layers(instance, bound)
    if old is None:
        return None
    union = open_union(old, instance.upper, key=build.fs_key, state_dir=state_dir)
    counts = rebase_upper(union, new)  # closes (commits) the union
    record_store_digests(instance.upper, new)
    shutil.rmtree(instance.layer.parent / PREVIOUS_DIR, ignore_errors=True)
    _previous_list(instance).unlink(missing_ok=True)
    return counts


def discard_previous_if_bound_to(instance: Instance, digest: str) -> None:
    """After a build that gave the store's own layer back: nothing to move later."""
    if store_digests(instance.upper) == [digest]:
        shutil.rmtree(instance.layer.parent / PREVIOUS_DIR, ignore_errors=True)
        _previous_list(instance).unlink(missing_ok=True)
