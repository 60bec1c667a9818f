"""``occlum mount`` (inspect the instance's union) and ``occlum package`` (ship it).

``mount`` opens the same union ``run`` would (the signed build's layers under
the writable store, with the instance's key), read-only unless asked, and
serves it in the background like ``occlumfs mount``: ``occlumfs umount MNT``
ends it. The detached server keeps the instance lock, so ``run`` and
``start`` refuse while it is mounted, and ``mount`` refuses while they run.

``package`` writes a tarball that is the same bytes for the same instance:
entries sorted, owner root, mtimes zero, gzip without a name or a date. It
holds what ``run`` reads (``Occlum.json``, the signed manifest, the layers)
and, when asked, the writable store; never ``image/``, never ``.occlum/``
(the development signing key) nor the build's bookkeeping.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

from libos.instance import Instance, write_atomic
from occlumfs.errors import NotFoundError, OcclumfsError, UsageError


def mount_instance(
    instance: Instance, mountpoint: Path, *, rw: bool = False, image_key: Path | None = None
) -> None:
    """Serve the instance's ``/`` at ``mountpoint`` in the background."""
    from libos.build import verify_build
    from libos.control import connect
    from libos.rootfs import _mount_module, _open_rootfs
    from libos.run import lock_instance, rebase_and_say

    mount = _mount_module()
    check_mountpoint, serve = mount.check_mountpoint, mount.serve

    sock = connect(instance)  # started: refused by the lock; dead: cleaned up
    if sock is not None:
        sock.close()
    check_mountpoint(mountpoint)
    lock_fd = lock_instance(instance, role="occlum mount")  # the detached server inherits it
    try:
        build = verify_build(instance, image_key)
        if rw:
            rebase_and_say(build)
        elif not instance.upper.exists():
            raise NotFoundError(f"{instance.upper}: nothing written yet (run the instance first)")
        fs = _open_rootfs(build, read_only=not rw)
        serve(fs, mountpoint, log_file=instance.run / "occlum.log")
    finally:
        os.close(lock_fd)


def _members(instance: Instance, with_run: bool) -> list[Path]:
    """The files and directories to pack, relative to the instance, sorted."""
    if not instance.manifest.is_file() or not instance.signature.is_file():
        raise NotFoundError(f"{instance.root}: not built; run 'occlum build' first")
    tops = [Path("Occlum.json"), Path("build"), Path("run")]
    out = []
    for top in tops:
        out.append(top)
        base = instance.root / top
        if top.name == "build" or (top.name == "run" and with_run):
            for dirpath, dirs, files in os.walk(base):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = Path(dirpath).relative_to(instance.root)
                for name in sorted(dirs) + sorted(files):
                    if name.startswith(".") or name.startswith("occlum."):
                        continue  # bookkeeping, lock, socket, log
                    out.append(rel / name)
    return sorted(out, key=lambda p: p.parts)


def package(instance: Instance, output: Path | None, *, with_run: bool = False) -> Path:
    """Write the instance's reproducible tarball; its path."""
    from libos.run import lock_instance

    name = instance.root.name
    output = Path(os.path.abspath(output or f"{name}.tar.gz"))
    if not output.name.endswith((".tar.gz", ".tgz")):
        raise UsageError(f"{output}: the package's name must end in .tar.gz or .tgz")
    if {instance.build, instance.run} & set(output.parents):
        raise UsageError(f"{output}: the package cannot be written inside what it packs")
    lock_fd = lock_instance(instance, role="occlum package") if with_run else None
    try:
        members = _members(instance, with_run)
        buf = io.BytesIO()
        with (
            gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for rel in members:
                _add(tar, instance.root / rel, f"{name}/{rel}")
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    try:
        write_atomic(output, buf.getvalue())
    except OSError as exc:
        raise OcclumfsError(f"{output}: {exc.strerror}") from None
    return output


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    st = os.lstat(path)
    info = tarfile.TarInfo(arcname)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif stat.S_ISREG(st.st_mode):
        info.size = st.st_size
        with open(path, "rb") as f:
            tar.addfile(info, f)
    else:
        raise OcclumfsError(f"{path}: not a file or directory; cannot package it")
