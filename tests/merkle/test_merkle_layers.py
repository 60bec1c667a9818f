"""Images as union layers: whiteouts and opaque directories in overlayfs' conventions.

Through the filesystem contract a whiteout is a character device 0/0 and an
opaque directory carries ``trusted.overlay.opaque = b"y"`` (docs/formats/image.md,
*Layers*). A tar source is an OCI layer: ``.wh.NAME`` becomes the whiteout of
NAME, ``.wh..wh..opq`` makes its directory opaque.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli

from merkle.trees import set_times
from occlumfs.errors import ExitCode, FormatError
from occlumfs.fs import Filesystem, iter_dir, lookup_path, read_all
from occlumfs.merkle import build_image, open_image_fs
from occlumfs.merkle.format import OPAQUE_VALUE, OPAQUE_XATTR, is_whiteout

T = 1_650_000_000  # seconds: a tar header holds whole seconds exactly
OPAQUE = OPAQUE_XATTR.decode()


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = T
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def _layer(path: Path, members) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data else None)
    return path


def _whiteout(fs: Filesystem, path: str) -> bool:
    attr = lookup_path(fs, path)
    return is_whiteout(attr.mode, attr.rdev)


def _opaque(fs: Filesystem, path: str) -> bool:
    ino = lookup_path(fs, path).ino
    return OPAQUE_XATTR in fs.listxattr(ino) and fs.getxattr(ino, OPAQUE_XATTR) == OPAQUE_VALUE


def _names(fs: Filesystem, path: str) -> list[bytes]:
    return [e.name for e in iter_dir(fs, lookup_path(fs, path).ino)]


@pytest.fixture(scope="module")
def oci_layer(tmp_path_factory):
    base = tmp_path_factory.mktemp("layer")
    archive = _layer(
        base / "layer.tar",
        [
            _member("a/", tarfile.DIRTYPE),
            _member("a/.wh.gone"),
            _member("a/here", data=b"here\n"),
            _member("b/", tarfile.DIRTYPE),
            _member("b/.wh..wh..opq"),
            _member("b/kept", data=b"kept\n"),
            # The marker before its directory's own entry, which has an xattr too.
            _member("c/.wh..wh..opq"),
            _member("c/", tarfile.DIRTYPE, pax_headers={"SCHILY.xattr.user.x": "1"}),
            _member(".wh.top"),
            # This layer's own entry wins over its whiteout, in either order.
            _member("d/.wh.x"),
            _member("d/x", data=b"new x\n"),
            _member("d/y", data=b"new y\n"),
            _member("d/.wh.y"),
            # A directory of this layer over its whiteout replaces the lower one: opaque.
            _member(".wh.e"),
            _member("e/inside", data=b"e\n"),
            _member("f/", tarfile.DIRTYPE),
            _member(".wh.f"),
            # Whiteouts deep in directories the archive only implies.
            _member("g/h/.wh.i"),
        ],
    )
    image = base / "layer.img"
    return archive, image, build_image(archive, image)


def test_an_oci_layer_becomes_whiteouts_and_opaque_directories(oci_layer):
    _, image, digest = oci_layer
    fs = open_image_fs(image, digest=digest, key=None)
    try:
        assert fs.info.has_xattrs
        assert _names(fs, "/") == [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"top"]
        assert _names(fs, "a") == [b"gone", b"here"]
        for path in ("a/gone", "top", "g/h/i"):
            assert _whiteout(fs, path), path
            attr = lookup_path(fs, path)
            assert stat.S_IMODE(attr.mode) == 0 and attr.mtime_ns == T * 10**9
        assert not any(b".wh." in name for name in _names(fs, "/") + _names(fs, "a"))
        assert _opaque(fs, "b") and _names(fs, "b") == [b"kept"]
        assert _opaque(fs, "c") and fs.getxattr(lookup_path(fs, "c").ino, b"user.x") == b"1"
        assert lookup_path(fs, "c").mode == stat.S_IFDIR | 0o755
        assert not _opaque(fs, "a") and not _opaque(fs, "d") and not _opaque(fs, "/")
        for name in ("x", "y"):
            attr = lookup_path(fs, f"d/{name}")
            assert attr.is_reg
            assert b"".join(read_all(fs, attr.ino)) == f"new {name}\n".encode()
        assert _opaque(fs, "e") and _names(fs, "e") == [b"inside"]
        assert _opaque(fs, "f") and _names(fs, "f") == []
        assert not _whiteout(fs, "g/h") and _names(fs, "g/h") == [b"i"]
    finally:
        fs.close()


def test_a_layer_tar_builds_the_same_image_as_its_overlay_directory(tmp_path):
    """The tar spelling and overlayfs' own spelling of one layer are one image."""
    small = _layer(
        tmp_path / "small.tar",
        [
            _member("a/", tarfile.DIRTYPE),
            _member("a/.wh.gone"),
            _member("b/", tarfile.DIRTYPE),
            _member("b/.wh..wh..opq"),
            _member("b/kept", data=b"kept\n"),
        ],
    )
    root = tmp_path / "dir"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    os.mknod(root / "a" / "gone", stat.S_IFCHR, os.makedev(0, 0))
    os.chmod(root / "a" / "gone", 0)
    (root / "b" / "kept").write_bytes(b"kept\n")
    os.chmod(root / "b" / "kept", 0o644)
    for d in (root, root / "a", root / "b"):
        os.chmod(d, 0o755)
    os.setxattr(root / "b", OPAQUE, OPAQUE_VALUE)
    set_times(root, T * 10**9)
    os.utime(root, ns=(0, 0))  # a directory the tar only implies has mtime 0
    from_dir = build_image(root, tmp_path / "dir.img")
    from_tar = build_image(small, tmp_path / "tar.img")
    assert from_dir == from_tar
    assert build_image(small, tmp_path / "again.img") == from_tar  # reproducible


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([_member("a/.wh..wh.plnk")], "unsupported whiteout metadata"),
        ([_member(".wh.")], "empty"),
        ([_member("a/.wh..")], "is '.'"),
        ([_member(".wh.x/", tarfile.DIRTYPE)], "a whiteout cannot be a directory"),
    ],
)
def test_bad_oci_markers_are_refused_in_one_line(tmp_path, members, words):
    archive = _layer(tmp_path / "bad.tar", members)
    with pytest.raises(FormatError, match=words.replace(".", r"\.")):
        build_image(archive, tmp_path / "lib.img")
    done = run_cli("mkimage", archive, tmp_path / "bad.img", check=False)
    assert done.returncode == ExitCode.FORMAT, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "bad.img").exists()


@pytest.mark.fuse
def test_a_mounted_layer_serves_whiteouts_and_opaque_marks(oci_layer, mount):
    _, image, digest = oci_layer
    with mount(image, "--digest", digest) as mnt:
        st = os.lstat(mnt / "a" / "gone")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert os.getxattr(mnt / "b", OPAQUE) == OPAQUE_VALUE
        assert OPAQUE in os.listxattr(mnt / "c")
        assert sorted(os.listdir(mnt / "b")) == ["kept"]
        assert (mnt / "d" / "x").read_bytes() == b"new x\n"
