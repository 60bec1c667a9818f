"""Fixtures that hand each conformance test a view of every subject.

* ``ro_view``: the reference tree, as held by each subject (in-process and
  through FUSE) and by the host directory itself. Shared for the whole session:
  read tests must not change it.
* ``rw_view``: a fresh empty directory in each writable subject and on the host.
* ``kernel_rw_view``: the same, limited to views that go through the kernel
  (FUSE mounts and the host), for tests only a real mount can run.
* ``read_only_view``: the reference tree in each read-only subject.
* ``kernel_ro_view``: the reference tree, through the kernel only.

Views are opened on first use and closed at the end of the session; closing a
FUSE view runs ``occlumfs umount`` and checks the server log for errors.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from conftest import mounted

from conformance.reference import build_reference_tree
from conformance.subjects import SUBJECTS, Prepared, Subject
from conformance.views import HostView, ObjectView, View

HOST = "host"
ACCESSES = ("object", "fuse")


def _ids(subjects: list[Subject]) -> list[str]:
    return [f"{s.name}-{access}" for s in subjects for access in ACCESSES]


READ_VIEW_IDS = [HOST, *_ids(SUBJECTS)]
WRITE_VIEW_IDS = [HOST, *_ids([s for s in SUBJECTS if s.writable])]
KERNEL_WRITE_VIEW_IDS = [i for i in WRITE_VIEW_IDS if i == HOST or i.endswith("-fuse")]
READ_ONLY_VIEW_IDS = _ids([s for s in SUBJECTS if not s.writable])
KERNEL_READ_VIEW_IDS = [i for i in READ_VIEW_IDS if i == HOST or i.endswith("-fuse")]


def view_params(view_ids: list[str]) -> list:
    """Fixture params; a view through a FUSE mount carries the ``fuse`` marker."""
    return [
        pytest.param(i, id=i, marks=pytest.mark.fuse) if i.endswith("-fuse") else i
        for i in view_ids
    ]


class ViewPool:
    """Opens each subject's views on demand, once, and closes them all at the end."""

    def __init__(self, base: Path, tree: Path) -> None:
        self.base = base
        self.tree = tree
        self.stack = ExitStack()
        self.subjects = {s.name: s for s in SUBJECTS}
        self.views: dict[tuple[str, bool], View] = {}
        self.prepared: dict[tuple[str, bool, Path | None], Prepared] = {}
        self.counter = itertools.count()

    def _scratch(self, label: str) -> Path:
        path = self.base / f"{label}-{next(self.counter)}"
        path.mkdir()
        return path

    def get(self, view_id: str, *, writable: bool) -> View:
        """The session's view: the reference tree (read-only), or an empty writable one."""
        key = (view_id, writable)
        if key not in self.views:
            self.views[key] = self._open(view_id, writable, self.stack)
        return self.views[key]

    @contextmanager
    def private(self, view_id: str, tree: Path) -> Iterator[View]:
        """A writable subject holding its own copy of ``tree``, closed on leaving."""
        with ExitStack() as stack:
            yield self._open(view_id, True, stack, tree=tree)

    def _open(self, view_id: str, writable: bool, stack: ExitStack, tree=None) -> View:
        if view_id == HOST:
            if not writable:
                return HostView(self.tree, HOST, writable=False)
            root = self._scratch("host-rw") / "root"
            if tree is None:
                root.mkdir()
            else:
                subprocess.run(["cp", "-a", str(tree), str(root)], check=True)
            return HostView(root, HOST)
        name, access = view_id.rsplit("-", 1)
        subject = self.subjects[name]
        if not writable:
            tree = self.tree
        # Storage is prepared once per subject and tree, and served both ways.
        key = (name, writable, tree)
        if key not in self.prepared:
            self.prepared[key] = subject.prepare(self._scratch(name), tree)
            if self.prepared[key].check is not None:
                # On the session's stack, so it runs after every view over it closed.
                self.stack.callback(_assert_consistent, view_id, self.prepared[key].check)
        prepared = self.prepared[key]
        if access == "object":
            fs = prepared.open_fs()
            stack.callback(fs.close)
            return ObjectView(fs, view_id, subject.writable)
        source, *options = prepared.mount_args
        mnt = stack.enter_context(
            mounted(source, self._scratch(f"{view_id}-mnt") / "mnt", *options)
        )
        return HostView(mnt, view_id, subject.writable)


def _assert_consistent(view_id: str, check) -> None:
    problems = check()
    assert not problems, f"{view_id}: storage inconsistent after the suite:\n" + "\n".join(
        problems[:30]
    )


@pytest.fixture(scope="session")
def reference_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference") / "tree"
    build_reference_tree(root)
    return root


@pytest.fixture(scope="session")
def view_pool(tmp_path_factory, reference_tree):
    pool = ViewPool(tmp_path_factory.mktemp("subjects"), reference_tree)
    with pool.stack:
        yield pool


@pytest.fixture(params=view_params(READ_VIEW_IDS))
def ro_view(request, view_pool) -> View:
    return view_pool.get(request.param, writable=False)


_test_dirs = itertools.count()


@pytest.fixture(params=view_params(WRITE_VIEW_IDS))
def rw_view(request, view_pool) -> View:
    return view_pool.get(request.param, writable=True).sub(f"t{next(_test_dirs):04d}")


@pytest.fixture(params=view_params(KERNEL_WRITE_VIEW_IDS))
def kernel_rw_view(request, view_pool) -> View:
    return view_pool.get(request.param, writable=True).sub(f"t{next(_test_dirs):04d}")


@pytest.fixture(params=view_params(READ_ONLY_VIEW_IDS))
def read_only_view(request, view_pool) -> View:
    return view_pool.get(request.param, writable=False)


@pytest.fixture(params=view_params(KERNEL_READ_VIEW_IDS))
def kernel_ro_view(request, view_pool) -> View:
    return view_pool.get(request.param, writable=False)
