"""mkimage on hostile sources, as users and third-party suites meet them: source
files whose reads fail, a build killed by SIGTERM or SIGHUP, odd tar headers.
Each must end in one line naming what and where, and leave nothing behind."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile

import pytest
from conftest import run_cli

from merkle.trees import pattern
from occlumfs.errors import ExitCode, OcclumfsError
from occlumfs.fs import ROOT_INO, iter_dir
from occlumfs.merkle import build_image, open_image_fs, verify_image
from occlumfs.merkle.build import _Builder
from occlumfs.merkle.format import BLOCK_SIZE, DESCRIPTOR_SIZE, Descriptor, Layout
from occlumfs.merkle.source import scan_directory


@pytest.mark.fuse
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_source_file_that_fails_to_read_is_named_with_its_error(tmp_path, mount, jobs):
    """A read that fails part-way (EIO from a bad block on a FUSE mount) comes back
    short first; the build must ask again and report the error itself, naming the
    source file, not claim the file changed nor name the image."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad").write_bytes(pattern("bad", 3 * BLOCK_SIZE))
    image = tmp_path / "src.img"
    digest = build_image(src, image)
    raw = bytearray(image.read_bytes())
    layout = Layout.of(Descriptor.parse(bytes(raw[:DESCRIPTOR_SIZE])))
    raw[(layout.data_start + 1) * BLOCK_SIZE + 7] ^= 1  # the file's middle block
    image.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    with mount(image, "--digest", digest, allow_log_errors=True) as mnt:
        done = run_cli("mkimage", "-j", jobs, mnt, out / "img", check=False)
    assert done.returncode == ExitCode.ERROR
    assert done.stderr == f"occlumfs: error: mkimage: {mnt / 'bad'}: Input/output error\n"
    assert done.stdout == ""
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_build_ended_by_sigterm_or_sighup_leaves_no_scratch(tmp_path, signum):
    """`timeout`, `docker stop`, a CI cancel or a closed terminal end a build as
    Ctrl-C does: "interrupted", exit 130, no scratch directory, spool or image.

    The source is a FIFO named as a tar archive: mkimage opens it after making
    its scratch directory, so once this test's open for writing returns, the
    build is under way with its scratch on disk (and waits for the archive)."""
    archive = tmp_path / "layer.tar"
    os.mkfifo(archive)
    out = tmp_path / "out"
    out.mkdir()
    build = subprocess.Popen(
        [sys.executable, "-m", "occlumfs", "mkimage", archive, out / "img"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        writer = os.open(archive, os.O_WRONLY)  # returns once mkimage opened it
        assert [p.name[:16] for p in out.iterdir()] == [".occlumfs-build-"]
        build.send_signal(signum)
        stdout, stderr = build.communicate(timeout=60)
        os.close(writer)
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    assert (build.returncode, stderr, stdout) == (130, b"occlumfs: interrupted\n", b"")
    assert list(out.iterdir()) == []


def test_a_tar_mtime_that_is_not_a_number_names_the_member(tmp_path):
    for i, text in enumerate(["nan", "inf", "-Infinity", "sNaN"]):
        archive = tmp_path / f"t{i}.tar"
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
            info = tarfile.TarInfo("odd")
            info.pax_headers = {"mtime": text}
            tf.addfile(info, io.BytesIO(b""))
        done = run_cli("mkimage", archive, tmp_path / "img", check=False)
        assert (done.returncode, done.stderr) == (
            ExitCode.FORMAT,
            f"occlumfs: error: tar member 'odd': bad mtime {text!r}\n",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"t{i}.tar" for i in range(4)]


@pytest.mark.timeout(20)  # before the fix, the FIFO's open waited for ever
@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_a_file_replaced_after_the_scan_is_a_change_not_opened(tmp_path, kind):
    """A regular file the scan found, replaced before its bytes are read: by a
    FIFO (whose open would wait for a writer for ever), a directory or a symlink.
    The build stops with "changed during the build", leaving nothing."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"scanned")
    (src / "g").write_bytes(b"other")
    builder = _Builder(None, None, 1, None)
    builder.numbering = scan_directory(src)[1]
    (src / "f").unlink()
    {"fifo": os.mkfifo, "directory": os.mkdir, "symlink": lambda p: os.symlink("g", p)}[kind](
        src / "f"
    )
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OcclumfsError, match=f"^{src / 'f'}: changed during the build$"):
        builder.write(str(out / "img"))
    assert list(out.iterdir()) == []


@pytest.mark.timeout(60)  # before the fix, each command waited for a writer for ever
def test_a_fifo_or_device_given_as_the_image_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for image in (fifo, "/dev/zero"):
        for command in (["verify"], ["digest"], ["ls"], ["cat"], ["stat"]):
            args = [*command, image] + (["/f"] if command[0] in ("cat", "stat") else [])
            done = run_cli(*args, check=False, timeout=30)
            assert (done.returncode, done.stdout) == (ExitCode.FORMAT, ""), args
            assert done.stderr == f"occlumfs: error: {image} is not a regular file, not an image\n"


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_a_tar_piped_in_builds_the_same_image_as_the_file(tmp_path, mode):
    """`docker export C | occlumfs mkimage /dev/stdin IMAGE`: a pipe cannot seek,
    so the archive is read as a stream (plain or compressed), to the same bytes."""
    archive = tmp_path / "layer.tar"
    with tarfile.open(archive, mode, format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("a", b"x" * 5000), ("d/b", pattern("b", 3 * BLOCK_SIZE + 1))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    digest = run_cli("mkimage", archive, tmp_path / "file.img").stdout
    piped = run_cli("mkimage", "/dev/stdin", tmp_path / "pipe.img", input=archive.read_bytes())
    assert piped.stdout == digest
    assert (tmp_path / "pipe.img").read_bytes() == (tmp_path / "file.img").read_bytes()
    junk = run_cli("mkimage", "/dev/stdin", tmp_path / "junk.img", input=b"junk", check=False)
    assert (junk.returncode, junk.stderr) == (
        ExitCode.FORMAT,
        "occlumfs: error: /dev/stdin: not a readable tar archive\n",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.img", "layer.tar", "pipe.img"]


def test_an_image_path_that_names_a_directory_is_refused(tmp_path):
    """`mkimage SRC out/` (meaning: into the directory out) wrote a file named
    `out`, or replaced an existing file `out`; an empty IMAGE failed with EBUSY
    on a scratch file's name. Each is a usage error, before anything is written."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    (tmp_path / "old.img").write_bytes(b"kept")
    through_click = "import sys\nfrom occlumfs.cli import main\nmain(sys.argv[1:])\n"
    for image in (f"{tmp_path}/absent/", f"{tmp_path}/old.img/", ""):
        for how in (["-m", "occlumfs"], ["-c", through_click]):
            done = subprocess.run(
                [sys.executable, *how, "mkimage", src, image], capture_output=True, text=True
            )
            assert (done.returncode, done.stdout) == (ExitCode.USAGE, ""), (how, image)
            assert done.stderr.endswith(f"error: {image!r} names no file for IMAGE\n"), how
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.img", "src"]
    assert (tmp_path / "old.img").read_bytes() == b"kept"


def test_a_source_date_epoch_before_what_mtimes_can_hold_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    lowest = -(1 << 63) // 1_000_000_000 + 1  # the earliest whole second an mtime holds
    run_cli("mkimage", src, tmp_path / "ok.img", env={"SOURCE_DATE_EPOCH": str(lowest)})
    done = run_cli(
        "mkimage", src, tmp_path / "img", env={"SOURCE_DATE_EPOCH": str(lowest - 1)}, check=False
    )
    assert (done.returncode, done.stdout) == (ExitCode.USAGE, "")
    assert (
        done.stderr == f"occlumfs: error: SOURCE_DATE_EPOCH={str(lowest - 1)!r} is out of range\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.img", "src"]


def test_an_image_directory_that_refuses_writes_names_the_image(tmp_path):
    """The error names IMAGE, which the user gave, not the scratch file or
    directory the build tried to make beside it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(src / "f", "f")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", ro], check=True)
    try:
        for source in (src, archive):
            done = run_cli("mkimage", source, ro / "img", check=False)
            assert (done.returncode, done.stdout) == (ExitCode.ERROR, "")
            assert done.stderr == f"occlumfs: error: mkimage: {ro / 'img'}: Read-only file system\n"
    finally:
        subprocess.run(["umount", "-l", ro], check=False)


def test_every_image_command_with_stdout_closed_is_one_line(tmp_path):
    """`occlumfs ... >&-`: Python starts with no sys.stdout. The plain mkimage
    died with a traceback, ls and cat with an internal error, and click's
    mkimage and digest dropped their output and exited 0."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    image = tmp_path / "img"
    run_cli("mkimage", src, image)
    through_click = "import sys\nfrom occlumfs.cli import main\nmain(sys.argv[1:])\n"
    commands = [
        ["mkimage", src, tmp_path / "new.img"],
        ["digest", image],
        ["verify", image],
        ["ls", image],
        ["cat", image, "/f"],
        ["stat", image, "/f"],
    ]
    for command in commands:
        for how in (["-m", "occlumfs"], ["-c", through_click]):
            done = subprocess.run(
                ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, *how, *map(str, command)],
                stderr=subprocess.PIPE,
                text=True,
            )
            assert (done.returncode, done.stderr) == (
                ExitCode.ERROR,
                "occlumfs: error: stdout is closed: nowhere to write the output\n",
            ), (how, command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "src"]


@pytest.mark.parametrize("key", [None, bytes(range(16))])
def test_an_image_of_an_empty_tree_verifies(tmp_path, key):
    """An empty directory (or an archive of no members) gives an image with an
    empty heap: verify read zero bytes of it from the block past the heap,
    beyond the covered blocks, and called the image malformed."""
    empty = tmp_path / "empty"
    empty.mkdir()
    archive = tmp_path / "none.tar"
    archive.write_bytes(bytes(10240))  # the end-of-archive blocks alone
    for source in (empty, archive):
        image = tmp_path / f"{source.name}.img"
        digest = build_image(source, image, key=key)
        verify_image(image, digest=digest, key=key)
        fs = open_image_fs(image, digest=digest, key=key)
        try:
            assert list(iter_dir(fs, ROOT_INO)) == []
        finally:
            fs.close()
