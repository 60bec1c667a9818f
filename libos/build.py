"""``occlum build``: ``image/`` → an image layer, and the config → a signed manifest.

The manifest is canonical JSON (sorted keys, no spaces) holding the runtime
config, each layer's digest and the libos version; its SHA-256 is the
instance's measurement (mrenclave). ``occlum run`` reads only the manifest,
its signature and the layers: never the editable ``Occlum.json``.

Incremental: the build remembers a fingerprint of ``image/`` (every entry's
path, type, mode, owner, size, mtime and link target) and of its inputs; when
nothing changed, the layer is not rebuilt, and an unchanged manifest is not
re-signed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from libos import __version__, machine
from libos.config import Config, check_config, load_config
from libos.instance import Instance, write_atomic
from libos.signing import (
    Signature,
    generate_dev_key,
    load_sign_key,
    mrenclave_of,
    mrsigner_of,
    sign_manifest,
    verify_manifest,
)
from occlumfs.errors import (
    FormatError,
    IntegrityError,
    NotFoundError,
    OcclumfsError,
    WrongKeyError,
)
from occlumfs.keys import load_key_file

log = logging.getLogger("libos.build")

MANIFEST_FORMAT = "occlum-manifest/1"


@dataclass(frozen=True)
class BuildResult:
    layer_digest: str
    mrenclave: str
    mrsigner: str
    layer_built: bool
    signed: bool
    dev_key: bool


def tree_fingerprint(root: Path) -> str:
    """SHA-256 over every entry's path, type, mode, owner, size, mtime and link target."""
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            line = (
                f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0"
                f"{st.st_mtime_ns}\0{st.st_ino}\0{target}\n"
            )
            h.update(os.fsencode(line))
    st = os.stat(root)
    h.update(f"root\0{st.st_mode:o}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def config_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rootfs_layers(config: Config) -> tuple[list[dict], dict]:
    """The ``/`` union's read-only layers and its writable layer, from the config."""
    roots = [m for m in config.mounts() if m["target"] == "/"]
    where = config.path or "Occlum.json"
    if len(roots) != 1 or roots[0]["type"] != "unionfs":
        raise FormatError(f"{where}: mount: expected one unionfs mount at '/'")
    layers = roots[0].get("options", {}).get("layers", [])
    if len(layers) != 2:
        raise FormatError(
            f"{where}: mount[/].options.layers: expected two layers "
            "(the image layer, then the writable one)"
        )
    return layers[:1], layers[1]


def _sign_key(instance: Instance, sign_key: Path | None):
    if sign_key is not None:
        return load_sign_key(sign_key), False
    path = instance.dev_sign_key
    if not path.exists():
        instance.private.mkdir(mode=0o700, exist_ok=True)
        generate_dev_key(path)
    return load_sign_key(path), True


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build(
    instance: Instance,
    *,
    sign_key: Path | None = None,
    image_key: Path | None = None,
    force: bool = False,
    progress=None,
) -> BuildResult:
    """Build ``instance``; ``progress`` is called with bytes hashed (for a bar)."""
    from occlumfs.merkle import build_image, read_digest

    config = load_config(instance.config_path)
    rootfs_layers(config)
    if not instance.image.is_dir():
        raise NotFoundError(f"{instance.image}: no image directory")
    key, dev = _sign_key(instance, sign_key)
    if dev:
        log.warning(
            "no --sign-key given: signing with this instance's development key %s; "
            "do not ship an instance signed with it",
            instance.dev_sign_key,
        )
    layer_key = load_key_file(image_key) if image_key else None
    key_id = machine.remember_image_key(layer_key) if layer_key else None
    instance.layer.parent.mkdir(parents=True, exist_ok=True)

    inputs = {
        "tree": tree_fingerprint(instance.image),
        "image_key": key_id,
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
    }
    state = _read_json(instance.build_state) or {}
    digest = None
    if not force and state.get("inputs") == inputs and instance.layer.exists():
        try:
            digest = read_digest(instance.layer)
        except OcclumfsError:
            digest = None
        if digest != state.get("layer_digest"):
            digest = None
    layer_built = digest is None
    if layer_built:
        from libos.rebase import discard_previous_if_bound_to, keep_previous_layer

        keep_previous_layer(instance, state.get("inputs", {}).get("image_key"))
        epoch = inputs["source_date_epoch"]
        digest = build_image(
            instance.image,
            instance.layer,
            key=layer_key,
            source_date_epoch=int(epoch) if epoch and epoch.isdigit() else None,
            progress=progress,
        )
        discard_previous_if_bound_to(instance, digest)

    manifest = canonical(
        {
            "format": MANIFEST_FORMAT,
            "libos_version": __version__,
            "config": config.data,
            "layers": [
                {
                    "path": str(instance.layer.relative_to(instance.build)),
                    "digest": digest,
                    "image_key": key_id,
                }
            ],
        }
    )
    signer = mrsigner_of(key.public_key())
    signed = (
        force
        or _read_bytes(instance.manifest) != manifest
        or state.get("mrsigner") != signer
        or not instance.signature.exists()
    )
    if signed:
        write_atomic(instance.manifest, manifest)
        write_atomic(instance.signature, sign_manifest(key, manifest))
    write_atomic(
        instance.build_state,
        json.dumps(
            {
                "inputs": inputs,
                "layer_digest": digest,
                "mrsigner": signer,
                "config_sha256": config_digest(instance.config_path),
            },
            indent=2,
        ).encode(),
    )
    return BuildResult(digest, mrenclave_of(manifest), signer, layer_built, signed, dev)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class VerifiedBuild:
    """What ``occlum run`` may trust: checked against the signature and the layers."""

    instance: Instance
    config: Config
    layers: list[tuple[Path, str, bytes | None]]  # (file, digest, image key)
    signature: Signature
    fs_key: bytes
    manifest: dict


def verify_build(instance: Instance, image_key: Path | None = None) -> VerifiedBuild:
    """Check signature, measurement and layer digests; one-line refusals otherwise."""
    from occlumfs.merkle import read_digest

    manifest_bytes = _read_bytes(instance.manifest)
    sig_bytes = _read_bytes(instance.signature)
    if manifest_bytes is None or sig_bytes is None:
        raise NotFoundError(f"{instance.root}: not built; run 'occlum build' first")
    signature = verify_manifest(manifest_bytes, sig_bytes, str(instance.signature))
    try:
        manifest = json.loads(manifest_bytes)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError
        config = check_config(manifest["config"], str(instance.manifest))
        entries = manifest["layers"]
    except (ValueError, KeyError, TypeError, FormatError):
        raise FormatError(
            f"{instance.manifest}: not an occlum manifest this version reads"
        ) from None
    given = load_key_file(image_key) if image_key else None
    layers = []
    for entry in entries:
        path = (instance.build / entry["path"]).resolve()
        if instance.build.resolve() not in path.parents:
            raise FormatError(f"{instance.manifest}: layer path {entry['path']!r} leaves build/")
        if not path.exists():
            raise NotFoundError(f"{path}: image layer missing; run 'occlum build'")
        found = read_digest(path)
        if found != entry["digest"]:
            raise IntegrityError(
                f"{path}: digest mismatch: the layer is not the one the manifest was signed over"
            )
        key = None
        if entry.get("image_key"):
            if given is not None and machine.key_fingerprint(given) == entry["image_key"]:
                key = given
            elif given is not None:
                raise WrongKeyError(f"{image_key}: not the key this instance was built with")
            else:
                key = machine.recall_image_key(entry["image_key"])
        layers.append((path, entry["digest"], key))
    fs_key = layers[0][2] if layers[0][2] is not None else None
    if fs_key is None:
        fs_key = machine.autokey(signature.mrsigner, config.product_id)
    return VerifiedBuild(instance, config, layers, signature, fs_key, manifest)


def verify_manifest_only(instance: Instance) -> Signature:
    """The checked signature of the build (no layers opened)."""
    manifest_bytes = _read_bytes(instance.manifest)
    sig_bytes = _read_bytes(instance.signature)
    if manifest_bytes is None or sig_bytes is None:
        raise NotFoundError(f"{instance.root}: not built; run 'occlum build' first")
    return verify_manifest(manifest_bytes, sig_bytes, str(instance.signature))


def build_status(instance: Instance) -> str:
    """``not built``, ``built`` or ``built, config changed since`` (from build/ alone)."""
    if not instance.manifest.exists() or not instance.signature.exists():
        return "not built"
    if not instance.image.is_dir():  # an unpacked package: nothing to rebuild from
        return "built"
    state = _read_json(instance.build_state) or {}
    try:
        current = config_digest(instance.config_path)
    except OSError:
        current = None
    if state.get("config_sha256") != current or state.get("inputs", {}).get(
        "tree"
    ) != tree_fingerprint(instance.image):
        return "built, config or image changed since (run 'occlum build')"
    return "built"
