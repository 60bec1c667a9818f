"""mkimage on hostile sources, as users and third-party suites meet them: source
files whose reads fail, a build killed by SIGTERM or SIGHUP, odd tar headers.
Each must end in one line naming what and where, and leave nothing behind."""

from __future__ import annotations

import pytest
from conftest import run_cli

from merkle.trees import pattern
from occlumfs.errors import ExitCode
from occlumfs.merkle import build_image
from occlumfs.merkle.format import BLOCK_SIZE, DESCRIPTOR_SIZE, Descriptor, Layout


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
