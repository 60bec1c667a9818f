"""With the kernel's writeback cache the kernel keeps a file's c/mtime: what the
server stores must be what ``stat`` showed (issue 6, section 8)."""

from __future__ import annotations

import os

import pytest
from sefs.helpers import make_volume

pytestmark = pytest.mark.fuse


def _times(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_ctime_ns


def test_times_stat_showed_survive_a_remount(tmp_path, mount):
    volume = make_volume(tmp_path / "vol")
    shown = {}
    with mount(*volume.mount_args()) as mnt:
        (mnt / "d").mkdir()
        for i in range(40):
            path = mnt / "d" / f"f{i:02d}"
            with open(path, "wb") as f:
                for k in range(1 + i % 5):  # several writes, some files left open longer
                    f.write(os.urandom(1000 + 4096 * k))
            if i % 3 == 0:
                os.chmod(path, 0o600)
            if i % 4 == 0:
                with open(path, "r+b") as f:
                    f.truncate(100 + i)
            shown[path.name] = _times(path)
        for name, times in shown.items():  # what stat shows does not move while mounted
            assert _times(mnt / "d" / name) == times, name
    with mount(*volume.mount_args()) as mnt:
        after = {name: _times(mnt / "d" / name) for name in shown}
    moved = {name: (shown[name], after[name]) for name in shown if after[name] != shown[name]}
    assert not moved
