"""The union through a real FUSE mount made by ``occlumfs mount --type union``."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from conftest import mounted, run_cli

from occlumfs.merkle import build_image
from unionfs.helpers import Stack, renameat2


@pytest.mark.fuse
def test_mount_creates_the_upper_and_serves_the_union(layers, tmp_path):
    stack = Stack(layers, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = [*stack.lower_args(), "--upper", stack.upper, *stack.secret_args()]
    done = run_cli("mount", *args, mnt, "--log-file", tmp_path / "log")
    assert "created a new SEFS store" in done.stderr
    try:
        assert sorted(os.listdir(mnt / "merged")) == [
            "from-bottom",
            "from-top",
            "hl-b",
            "shared",
            "sub-bottom",
        ]
        assert not (mnt / "deleted-file").exists() and os.listdir(mnt / "opaque") == ["shown"]
        inos = {p: os.lstat(mnt / p).st_ino for p in ("low-only", "tree", "tree/a/b/deep")}
        os.chmod(mnt / "low-only", 0o600)
        (mnt / "both").write_bytes(b"changed\n")
        os.rename(mnt / "tree", mnt / "merged/tree-moved")
        os.unlink(mnt / "merged/shared")
        assert renameat2(mnt / "low-only", mnt / "both", 1) == errno.EEXIST  # NOREPLACE
        assert renameat2(mnt / "low-only", mnt / "both", 4) == errno.EINVAL  # WHITEOUT
        assert renameat2(mnt / "low-only", mnt / "opaque", 2) == 0  # EXCHANGE
        assert stat.S_ISDIR(os.lstat(mnt / "low-only").st_mode)
    finally:
        run_cli("umount", mnt)
    with mounted(stack.upper, mnt, *stack.lower_args(), *stack.secret_args()):
        assert (mnt / "both").read_bytes() == b"changed\n"
        assert (mnt / "opaque").read_bytes() == b"bottom: low-only\n"
        assert os.lstat(mnt / "opaque").st_ino == inos["low-only"]
        assert stat.S_IMODE(os.lstat(mnt / "opaque").st_mode) == 0o600
        assert os.lstat(mnt / "merged/tree-moved").st_ino == inos["tree"]
        assert os.lstat(mnt / "merged/tree-moved/a/b/deep").st_ino == inos["tree/a/b/deep"]
        assert sorted(os.listdir(mnt / "merged")) == [
            "from-bottom",
            "from-top",
            "hl-b",
            "sub-bottom",
            "tree-moved",
        ]
        assert not (mnt / "tree").exists()
    # The host sees a SEFS store, nothing of the union's structure.
    raw = b"".join(p.read_bytes() for p in stack.upper.rglob("*") if p.is_file())
    for secret in (b"tree-moved", b"trusted.occlumfs", b"trusted.overlay", b"opaque", b"sha256:"):
        assert secret not in raw, secret


def test_an_upper_refuses_other_lowers(layers, tmp_path):
    stack = Stack(layers, tmp_path)
    stack.open().close()
    other_tree = tmp_path / "other"
    other_tree.mkdir()
    (other_tree / "x").write_bytes(b"x")
    other = tmp_path / "other.img"
    other_digest = build_image(other_tree, other)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["--lower", layers.images[0], "--lower", other, "--upper", stack.upper]
    args += ["--key-file", stack.key_file, "--state-dir", stack.state]
    pins = ["--digest", layers.digests[0], "--digest", other_digest]
    done = run_cli("mount", *args, *pins, mnt, check=False)
    if os.path.ismount(mnt):
        run_cli("umount", mnt)
    assert done.returncode == 13, done.stderr
    message = done.stderr.strip()
    assert "\n" not in message and "lower 1" in message and other_digest in message
    assert layers.digests[1] in message and "Traceback" not in done.stderr
    fewer = run_cli("mount", *args[:2], *args[4:], *pins[:2], mnt, check=False)
    if os.path.ismount(mnt):
        run_cli("umount", mnt)
    assert fewer.returncode == 13 and "made over 2 lower(s), 1 given" in fewer.stderr


def test_bad_union_command_lines_are_one_line_errors(layers, tmp_path):
    stack = Stack(layers, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lower = ["--lower", layers.images[0], "--lower", layers.images[1]]
    cases = {
        "one --digest for two lowers": [*lower, "--digest", layers.digests[0]],
        "--upper twice": [*lower, "--upper", stack.upper, stack.upper],
        "--upper without a union": ["--type", "sefs", "--upper", stack.upper, stack.upper],
        "no upper": [*lower],
    }
    for what, args in cases.items():
        done = run_cli("mount", *args, "--key-file", stack.key_file, mnt, check=False)
        assert done.returncode == 2, (what, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, what
    wrong_key = tmp_path / "wrong.key"
    run_cli("keygen", wrong_key)
    stack.open().close()
    done = run_cli(
        "mount",
        *lower,
        "--upper",
        stack.upper,
        "--key-file",
        wrong_key,
        "--state-dir",
        stack.state,
        mnt,
        check=False,
    )
    assert done.returncode == 12, done.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.fuse
def test_read_only_mount(layers, tmp_path):
    stack = Stack(layers, tmp_path)
    stack.open().close()
    mnt = tmp_path / "mnt"
    with mounted(stack.upper, mnt, *stack.lower_args(), *stack.secret_args(), "--ro"):
        assert (mnt / "both").read_bytes() == b"top: both\n"
        try:
            os.chmod(mnt / "both", 0)
        except OSError as exc:
            assert exc.errno == errno.EROFS
        else:
            raise AssertionError("chmod on a read-only union succeeded")


def _tar(path, members: dict[str, bytes | None]) -> None:
    """A tar of regular files (bytes) and directories (None)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))


@pytest.mark.fuse
def test_a_stack_of_oci_layers_mounts_as_a_union(tmp_path):
    # OCI spells deletions .wh.NAME and opaque directories .wh..wh..opq;
    # mkimage keeps them as whiteouts and opaque marks, the union obeys them.
    # The top layer is encrypted and opened with --lower-key-file.
    _tar(
        tmp_path / "base.tar",
        {"etc": None, "etc/a": b"a", "etc/b": b"b", "d": None, "d/x": b"x", "d/y": b"y"},
    )
    _tar(
        tmp_path / "top.tar",
        {
            "etc": None,
            "etc/.wh.a": b"",
            "d": None,
            "d/.wh..wh..opq": b"",
            "d/z": b"z",
            "new": b"new",
        },
    )
    keys = [tmp_path / "base.key", tmp_path / "top.key"]
    args = []
    for name, key in zip(("base", "top"), keys, strict=True):
        run_cli("keygen", key)
        done = run_cli(
            "mkimage", "--key-file", key, tmp_path / f"{name}.tar", tmp_path / f"{name}.img"
        )
        args += ["--lower", tmp_path / f"{name}.img", "--digest", done.stdout.split()[-1]]
    for key in keys:
        args += ["--lower-key-file", key]
    run_cli("keygen", tmp_path / "upper.key")
    upper = [
        "--upper",
        tmp_path / "upper",
        "--key-file",
        tmp_path / "upper.key",
        "--state-dir",
        tmp_path / "state",
    ]
    with mounted(
        tmp_path / "upper",
        tmp_path / "mnt",
        *args,
        "--key-file",
        tmp_path / "upper.key",
        "--state-dir",
        tmp_path / "state",
    ) as mnt:
        assert sorted(os.listdir(mnt)) == ["d", "etc", "new"]
        assert os.listdir(mnt / "etc") == ["b"] and os.listdir(mnt / "d") == ["z"]
        assert (mnt / "new").read_bytes() == b"new"
        os.rename(mnt / "etc", mnt / "etc2")
    one_key = run_cli(
        "mount", *args[:8], "--lower-key-file", keys[0], *upper, tmp_path / "mnt", check=False
    )
    assert one_key.returncode == 12, one_key.stderr  # base's key does not open top
    assert not os.path.ismount(tmp_path / "mnt")
