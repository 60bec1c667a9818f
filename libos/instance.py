"""An Occlum instance on disk: ``Occlum.json``, ``image/``, ``build/``, ``run/``.

``occlum new``/``init`` lay it out; every other command finds its files
through :class:`Instance`, so the layout is stated once.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from libos.config import DEFAULT_CONFIG, dump_config
from occlumfs.errors import NotFoundError, OcclumfsError, UsageError
from occlumfs.hostio import HostDir

IMAGE_DIRS = ("bin", "lib", "lib64", "root", "host", "tmp", "dev", "proc", "etc", "sbin")
MUSL_LOADER = "lib/ld-musl-x86_64.so.1"
HOST_ETC = ("hosts", "resolv.conf")


@dataclass(frozen=True)
class Instance:
    root: Path

    @classmethod
    def find(cls, path: Path | None = None) -> Instance:
        """The instance at ``path`` (default: the current directory)."""
        root = Path(os.path.abspath(path or "."))
        if not (root / "Occlum.json").is_file():
            raise NotFoundError(
                f"{root}: not an Occlum instance (no Occlum.json); run 'occlum init'"
            )
        return cls(root)

    @property
    def config_path(self) -> Path:
        return self.root / "Occlum.json"

    @property
    def image(self) -> Path:
        return self.root / "image"

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def layer(self) -> Path:
        """The image layer built from ``image/``."""
        return self.build / "mount" / "__ROOT" / "image.layer"

    @property
    def manifest(self) -> Path:
        return self.build / "manifest.json"

    @property
    def signature(self) -> Path:
        return self.build / "manifest.sig"

    @property
    def build_state(self) -> Path:
        """What the last build saw (for incremental builds); not part of the trust chain."""
        return self.build / ".build-state.json"

    @property
    def upper(self) -> Path:
        """The writable SEFS store of the union."""
        return self.run / "mount" / "__ROOT"

    @property
    def lock(self) -> Path:
        return self.run / "occlum.lock"

    @property
    def private(self) -> Path:
        """Instance-local secrets (the development signing key), mode 0700."""
        return self.root / ".occlum"

    @property
    def dev_sign_key(self) -> Path:
        return self.private / "dev-sign-key.pem"


def create(root: Path, *, fresh: bool) -> Instance:
    """Lay out an instance at ``root`` (``fresh``: the directory must not exist yet)."""
    root = Path(os.path.abspath(root))
    if fresh and root.exists():
        raise UsageError(f"{root}: already exists; 'occlum new' makes a new directory")
    if (root / "Occlum.json").exists():
        raise UsageError(f"{root}: already an Occlum instance (Occlum.json exists)")
    made = False
    try:
        root.mkdir(parents=True, exist_ok=not fresh)
        made = fresh
        instance = Instance(root)
        _write_skeleton(instance)
    except OSError as exc:
        if made:  # no half-made instance left behind
            shutil.rmtree(root, ignore_errors=True)
        # A missing parent is made; ENOENT is a parent that takes no directory (/proc).
        error = NotFoundError if isinstance(exc, FileNotFoundError) else OcclumfsError
        raise error(f"{exc.filename or root}: {exc.strerror}") from None
    return instance


def _write_skeleton(instance: Instance) -> None:
    image = instance.image
    for name in IMAGE_DIRS:
        (image / name).mkdir(parents=True, exist_ok=True)
    (image / "tmp").chmod(0o1777)
    (image / "root").chmod(0o700)
    etc = image / "etc"
    for name in HOST_ETC:
        host = Path("/etc") / name
        text = host.read_bytes() if host.is_file() else b""
        if name == "hosts" and not text:
            text = b"127.0.0.1\tlocalhost\n::1\tlocalhost\n"
        (etc / name).write_bytes(text)
    zone = _host_localtime()
    if zone is not None:
        shutil.copyfile(zone, etc / "localtime")
    else:
        (etc / "localtime").write_bytes(b"")
    loader = Path("/") / MUSL_LOADER
    if loader.exists():
        target = image / MUSL_LOADER
        shutil.copyfile(loader.resolve(), target)
        target.chmod(0o755)
    for sub in (instance.build, instance.run):
        sub.mkdir(exist_ok=True)
    instance.private.mkdir(mode=0o700, exist_ok=True)
    write_atomic(instance.config_path, dump_config(DEFAULT_CONFIG).encode())


def _host_localtime() -> Path | None:
    for candidate in (Path("/etc/localtime"), Path("/usr/share/zoneinfo/UTC")):
        if candidate.exists():
            return candidate.resolve()
    return None


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` whole (a temporary file, fsync, rename).

    Through :class:`~occlumfs.hostio.HostDir`: a link planted in the instance
    at either name is refused, never followed.
    """
    with HostDir.open(path.parent, follow=True) as parent:
        parent.replace_file(path.name, data, mode=mode)
