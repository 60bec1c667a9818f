"""occlumfs.hostio: directories by descriptor, regular files only, atomic replace."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from occlumfs.errors import FormatError, IntegrityError, NotFoundError, UsageError
from occlumfs.hostio import HostDir, read_named_file
from occlumfs.keys import load_key_file, write_key_file


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_bytes(b"important\n")
    return path


def _plant(path, kind, victim):
    {
        "symlink": lambda: path.symlink_to(victim),
        "hardlink": lambda: os.link(victim, path),
        "fifo": lambda: os.mkfifo(path),
        "dir": path.mkdir,
        "device": lambda: os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3)),
    }[kind]()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "dir", "device"])
def test_every_way_in_refuses_an_entry_that_is_not_a_lone_regular_file(tmp_path, victim, kind):
    store = tmp_path / "store"
    store.mkdir()
    _plant(store / "x", kind, victim)
    with HostDir.open(store) as d:
        for attempt in (
            lambda: d.read_file("x"),
            lambda: d.write_file("x", b"evil"),
            lambda: d.replace_file("x", b"evil"),
            lambda: d.open_file("x", os.O_RDWR | os.O_CREAT),
            lambda: d.rename("x", "y"),
            lambda: d.unlink("x"),
            lambda: d.fsync_file("x"),
            lambda: d.replace_file("y", b"evil", tmp="x"),
        ):
            with pytest.raises(IntegrityError, match=f"{store}/x: "):
                attempt()
    assert victim.read_bytes() == b"important\n"
    assert os.path.lexists(store / "x") and not (store / "y").exists()


def test_a_file_named_where_a_directory_belongs_is_the_callers_mistake(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    os.mkfifo(tmp_path / "p")
    for path, message in (
        (tmp_path / "f", "is a regular file, not a directory"),
        (tmp_path / "p", "is a fifo, not a directory"),
        (tmp_path / "f" / "x", "a component of the path is not a directory"),
    ):
        with pytest.raises(UsageError, match=message):
            HostDir.open(path)
        with pytest.raises(UsageError, match=message):
            HostDir.open(path, follow=True)


def test_a_directory_through_a_symlink_is_refused_unless_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(IntegrityError, match="is a symlink, not a directory"):
        HostDir.open(tmp_path / "link")
    with HostDir.open(tmp_path / "link", follow=True) as d:
        d.mkdir("m")
    (tmp_path / "real" / "sub").symlink_to(tmp_path / "real" / "m")
    with HostDir.open(tmp_path / "real") as d:
        with d.subdir("m") as m:
            assert m.listdir() == []
        with pytest.raises(IntegrityError, match="sub: is a symlink"):
            d.subdir("sub")
        with pytest.raises(NotFoundError):
            d.subdir("missing")
        with pytest.raises(ValueError):
            d.open_file("m/x")
        with pytest.raises(ValueError):
            d.open_file("x", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)


def test_replacing_is_all_or_nothing(tmp_path):
    with HostDir.open(tmp_path) as d:
        d.replace_file("f", b"old")
        with pytest.raises(RuntimeError), d.replacing("f") as fd:
            os.write(fd, b"half")
            raise RuntimeError("interrupted")
        assert (tmp_path / "f").read_bytes() == b"old"
        assert sorted(os.listdir(tmp_path)) == ["f"]  # no temporary file left
        with d.replacing("f", mode=0o644, durable=False) as fd:
            os.write(fd, b"new")
        assert d.read_file("f") == b"new" and d.read_file("f", 2) == b"ne"
        assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644  # the new file's mode
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_key_file_write_never_follows_a_planted_link(tmp_path, victim):
    (tmp_path / "k").symlink_to(victim)
    with pytest.raises(IntegrityError):
        write_key_file(tmp_path / "k", overwrite=True)
    assert victim.read_bytes() == b"important\n"
    key = write_key_file(tmp_path / "k2")
    assert load_key_file(tmp_path / "k2") == key
    assert stat.S_IMODE((tmp_path / "k2").stat().st_mode) == 0o600


def test_two_threads_replacing_one_name_never_collide(tmp_path):
    # A SEFS commit's background state write and a create's may replace the same
    # state file at once in one process: their temporary names must differ.
    errors: list[BaseException] = []

    def replace_many(data: bytes) -> None:
        try:
            with HostDir.open(tmp_path) as where:
                for _ in range(300):
                    where.replace_file("state.json", data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replace_many, args=(b"%d" % i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (tmp_path / "state.json").read_bytes() in (b"0", b"1")
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temporary left behind


def test_a_named_file_that_cannot_be_read_is_one_line_naming_it(tmp_path):
    (tmp_path / "f").write_bytes(b"0123456789")
    assert read_named_file(tmp_path / "f", "key file", limit=4) == b"0123"
    with pytest.raises(NotFoundError, match=r"missing: BOM file not found$"):
        read_named_file(tmp_path / "missing", "BOM file")
    with pytest.raises(FormatError, match=r"is a directory, not a signing key$"):
        read_named_file(tmp_path, "signing key")


def test_a_create_never_follows_a_dangling_symlink_and_keeps_an_existing_file(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    outside = tmp_path / "outside"  # does not exist: O_CREAT through the link would make it
    (store / "dangling").symlink_to(outside)
    (store / "kept").write_bytes(b"kept\n")
    with HostDir.open(store) as d:
        with pytest.raises(IntegrityError, match=f"{store}/dangling: is a symlink"):
            d.open_file("dangling", os.O_RDWR | os.O_CREAT)
        assert not outside.exists()
        # A new name is made (mode as asked, one link); an existing file is opened as it is.
        fd = d.open_file("new", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            st = os.fstat(fd)
            assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
            assert stat.S_IMODE(st.st_mode) == 0o640 & ~_umask()
        finally:
            os.close(fd)
        fd = d.open_file("kept", os.O_RDWR | os.O_CREAT)
        try:
            assert os.read(fd, 100) == b"kept\n"
        finally:
            os.close(fd)
        with pytest.raises(FileExistsError):
            d.open_file("kept", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    assert (store / "kept").read_bytes() == b"kept\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
