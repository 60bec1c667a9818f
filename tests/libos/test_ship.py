"""occlum mount (inspection), occlum package (shipping) and gen-image-key."""

from __future__ import annotations

import errno
import tarfile

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)
from libos_fixtures import assert_no_leftover_mounts

pytestmark = pytest.mark.fuse  # mount and run serve the union over FUSE

SH = "/bin/busybox"


def test_package_is_reproducible_and_runs_elsewhere_with_the_key(tmp_path, hello_world, occlum):
    key = tmp_path / "image.key"
    occlum("gen-image-key", key)
    assert key.stat().st_mode & 0o777 == 0o600
    occlum("new", "inst", cwd=tmp_path)
    inst = tmp_path / "inst"
    (inst / "image/bin/hello_world").write_bytes(hello_world.read_bytes())
    (inst / "image/bin/hello_world").chmod(0o755)
    occlum("build", "--image-key", key, cwd=inst)
    occlum("run", "/bin/hello_world", cwd=inst)  # a run/ that must not be packed

    first = occlum("package", tmp_path / "a.tar.gz", cwd=inst).stdout.strip()
    (inst / "Occlum.json").touch()  # a new mtime changes nothing
    occlum("package", tmp_path / "b.tar.gz", cwd=inst)
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    with tarfile.open(first) as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    assert "inst/build/manifest.json" in names and "inst/Occlum.json" in names
    assert not [n for n in names if n.startswith(("inst/image", "inst/.occlum", "inst/run/"))]

    # Another machine (its own state directory): it runs with the key, only with it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with tarfile.open(first) as tar:
        tar.extractall(elsewhere, filter="data")
    other = {"OCCLUM_STATE_DIR": str(tmp_path / "other-machine")}
    unpacked = elsewhere / "inst"
    # Nothing to rebuild from (no image/): not "changed since (run 'occlum build')".
    assert occlum("status", cwd=unpacked, env=other).stdout == "built\n"
    no_key = occlum("run", "/bin/hello_world", cwd=unpacked, env=other, check=False)
    assert no_key.returncode != 0 and no_key.stderr.count("\n") == 1, no_key.stderr
    ran = occlum("run", "--image-key", key, "/bin/hello_world", cwd=unpacked, env=other)
    assert ran.stdout == "Hello World!\n"


def test_package_refuses_an_unbuilt_instance(tmp_path, occlum):
    occlum("new", "inst", cwd=tmp_path)
    out = occlum("package", cwd=tmp_path / "inst", check=False)
    assert out.returncode == 14 and "not built" in out.stderr


def test_mount_shows_the_union_read_only_unless_rw(built, tmp_path, occlum):
    occlum("run", SH, "sh", "-c", "echo mine > /root/x", cwd=built)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    occlum("mount", mnt, cwd=built)
    try:
        assert (mnt / "root/x").read_text() == "mine\n"
        assert (mnt / "bin/busybox").stat().st_size > 0
        with pytest.raises(OSError) as refused:
            (mnt / "root/y").write_text("no")
        assert refused.value.errno == errno.EROFS
        for verb in (("run", SH, "true"), ("start",)):
            busy = occlum(*verb, cwd=built, check=False)
            assert busy.returncode == 16 and busy.stderr.count("\n") == 1, busy.stderr
        for verb in ("stop", "kill"):  # not started, and nothing to stop: say who holds it
            held = occlum(verb, cwd=built, check=False)
            assert held.returncode == 16 and held.stderr.count("\n") == 1, held.stderr
            assert "not started; occlum mount holds it (pid " in held.stderr
    finally:
        occlum("umount", mnt, module="occlumfs")
    occlum("mount", mnt, "--rw", cwd=built)
    try:
        (mnt / "root/y").write_text("written outside\n")
    finally:
        occlum("umount", mnt, module="occlumfs")
    assert_no_leftover_mounts(built)
    assert occlum("run", SH, "cat", "/root/y", cwd=built).stdout == "written outside\n"

    occlum("start", cwd=built)
    try:
        busy = occlum("mount", mnt, cwd=built, check=False)
        assert busy.returncode == 16 and "is started" in busy.stderr
    finally:
        occlum("stop", cwd=built)
