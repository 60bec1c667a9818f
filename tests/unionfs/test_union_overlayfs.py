"""The union against the kernel's overlayfs, side by side.

The same two lower trees are served twice: as plain directories under a kernel
overlay mount (``redirect_dir=on,index=on``: the features our rules promise,
rename of lower directories and hard links kept across copy-up) and as image
layers under our union over a fresh SEFS upper, through ``occlumfs mount``.
Every operation runs on both; its outcome (a value or an errno) and then the
whole tree a program sees (types, modes, sizes, link counts, owners, contents,
symlink targets, user xattrs, which names share an inode) must be the same.

Where the two differ on purpose, the test says so next to the difference, and
docs/unionfs.md says it for users.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import random
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import mounted

from occlumfs.keys import write_key_file
from occlumfs.merkle import build_image
from unionfs.helpers import RENAME_EXCHANGE, RENAME_NOREPLACE, _file, _whiteout, renameat2

pytestmark = pytest.mark.fuse


def _bottom(root: Path) -> None:
    _file(root / "f", b"bottom f\n")
    _file(root / "g", b"bottom g\n" * 1000)
    _file(root / "owned", b"owned\n", 0o4750)
    os.chown(root / "owned", 1234, 5678)
    os.setxattr(root / "owned", "user.k", b"v")
    os.utime(root / "owned", ns=(1_000_000_123, 2_000_000_456))
    _file(root / "d/a", b"bottom d/a\n")
    _file(root / "d/b", b"bottom d/b\n")
    _file(root / "d/sub/deep", b"bottom d/sub/deep\n")
    _file(root / "m/low", b"bottom m/low\n")
    _file(root / "m/gone", b"bottom m/gone\n")
    _file(root / "op/hidden", b"bottom op/hidden\n")
    _file(root / "wd/x", b"bottom wd/x\n")
    _file(root / "hl1", b"hard-linked\n")
    os.link(root / "hl1", root / "d/hl2")
    os.symlink("f", root / "ln")
    (root / "empty").mkdir()
    os.chmod(root / "empty", 0o750)


def _top(root: Path) -> None:
    _file(root / "g", b"top g\n")
    _file(root / "m/high", b"top m/high\n")
    _whiteout(root / "m/gone")
    (root / "op").mkdir()
    os.setxattr(root / "op", "trusted.overlay.opaque", b"y")
    _file(root / "op/shown", b"top op/shown\n")
    _whiteout(root / "wd")


_TREES = (("bottom", _bottom), ("top", _top))


@pytest.fixture(scope="module")
def lowers(tmp_path_factory) -> list[tuple[Path, Path, str]]:
    """(tree, image, digest) per lower, bottom first."""
    where = tmp_path_factory.mktemp("overlay-lowers")
    out = []
    for name, build in _TREES:
        tree = where / name
        tree.mkdir()
        build(tree)
        image = where / f"{name}.img"
        out.append((tree, image, build_image(tree, image)))
    return out


def _run(*argv: str | os.PathLike) -> None:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert done.returncode == 0, f"{argv}: {done.stderr}"


@contextmanager
def kernel_overlay(lowers, where: Path) -> Iterator[Callable[[], Path]]:
    """The kernel's overlay over the lower trees; yields a remount function.

    Its upper lives on a tmpfs of its own: overlayfs refuses an upper on
    overlayfs (a container's /tmp) and tmpfs holds trusted xattrs. A remount
    mounts a copy of the upper (``cp -a`` keeps its hard links and trusted
    xattrs): with ``index=on`` overlayfs refuses an upper still held by a
    copy of the old mount, which any mount namespace made meanwhile (a
    sandbox of another test run) keeps.
    """
    scratch, mnt = where / "kernel", where / "kernel-mnt"
    scratch.mkdir()
    mnt.mkdir()
    _run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", scratch)
    lowerdir = ":".join(str(tree) for tree, _, _ in reversed(lowers))
    generation = iter(range(1_000_000))
    # upper/ and work/ (which holds the index of hard-linked copies) are
    # copied together, so that cp keeps the links between them.
    current = scratch / "0"

    def mount() -> None:
        opts = f"lowerdir={lowerdir},upperdir={current}/upper,workdir={current}/work"
        _run("mount", "-t", "overlay", "overlay", "-o", opts + ",redirect_dir=on,index=on", mnt)

    def remount() -> Path:
        nonlocal current
        _run("umount", mnt)
        copy = scratch / str(next(generation) + 1)
        copy.mkdir()
        _run("cp", "-a", current / "upper", current / "work", copy)
        current = copy
        # The index names the upper it belongs to by file handle: the copy's
        # is another; without the mark overlayfs records the new one.
        os.removexattr(current / "work/index", "trusted.overlay.upper")
        mount()
        return mnt

    (current / "upper").mkdir(parents=True)
    (current / "work").mkdir()
    mount()
    try:
        yield remount
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        subprocess.run(["umount", "-l", scratch], capture_output=True)


class Ours:
    """Our union over the images, a fresh upper; ``remount`` unmounts and mounts again."""

    def __init__(self, lowers, where: Path) -> None:
        self.upper = where / "upper"
        self.mnt = where / "ours-mnt"
        key = where / "upper.key"
        write_key_file(key)
        self.args: list[str | os.PathLike] = []
        for _, image, digest in lowers:
            self.args += ["--lower", image, "--digest", digest]
        self.args += ["--key-file", key, "--state-dir", where / "state"]
        self._ctx = None

    def __enter__(self) -> Ours:
        self._ctx = mounted(self.upper, self.mnt, *self.args)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def remount(self) -> Path:
        self._ctx.__exit__(None, None, None)
        self._ctx = mounted(self.upper, self.mnt, *self.args)
        self._ctx.__enter__()
        return self.mnt


@pytest.fixture
def twins(lowers, tmp_path):
    """(kernel, ours): the two mounts, each with a ``root`` and a ``remount``."""
    with kernel_overlay(lowers, tmp_path) as kremount, Ours(lowers, tmp_path) as ours:
        yield Twins(tmp_path / "kernel-mnt", kremount, ours)


class Twins:
    def __init__(self, kernel: Path, kremount, ours: Ours) -> None:
        self.roots = (kernel, ours.mnt)
        self._kremount, self._ours = kremount, ours

    def remount(self) -> None:
        self._kremount()
        self._ours.remount()

    def both(self, op: Callable[[Path], object]) -> object:
        """Run ``op(root)`` on both; the outcomes must match; returns the kernel's."""
        kernel, ours = (_outcome(op, root) for root in self.roots)
        assert ours == kernel, f"{getattr(op, 'what', op)}: overlayfs {kernel}, ours {ours}"
        return kernel

    def same_tree(self, context: str = "") -> None:
        wrong: list[str] = []
        kernel, ours = snapshot(self.roots[0], []), snapshot(self.roots[1], wrong)
        assert not wrong, f"{context}: d_ino is not st_ino for {wrong}"
        diff = {
            p: (kernel.get(p), ours.get(p))
            for p in sorted(set(kernel) | set(ours))
            if kernel.get(p) != ours.get(p)
        }
        assert not diff, f"{context}: path: (overlayfs, ours)\n" + "\n".join(
            f"  {p}: {k}\n  {' ' * len(p)}  {o}" for p, (k, o) in diff.items()
        )


def _outcome(op, root: Path):
    try:
        return ("ok", op(root))
    except OSError as exc:
        return ("errno", errno.errorcode.get(exc.errno, exc.errno))


def snapshot(root: Path, d_ino_wrong: list[str]) -> dict[str, tuple]:
    """What a program sees under ``root``, by relative path.

    Names whose ``d_ino`` in the listing is not their ``st_ino`` go to
    ``d_ino_wrong``: overlayfs without ``xino`` lists its directories with
    the lower's numbers; the union must not (find, du and ls -i rely on it).
    """
    out: dict[str, tuple] = {}
    inos: dict[int, list[str]] = {}
    dinos: dict[str, int] = {}

    def walk(rel: str) -> None:
        path = root / rel if rel else root
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        entry: list = [stat.filemode(st.st_mode), st.st_uid, st.st_gid]
        if kind == stat.S_IFDIR:
            with os.scandir(path) as it:
                listed = [(e.name, _dtype(e), e.inode()) for e in it]
            names = [name for name, _, _ in listed]
            assert len(names) == len(set(names)), f"{path} lists a name twice"
            # 1 is "not counted" (a merged directory: both say so, but they
            # copy directories up at different moments); any other count is
            # exact.
            subdirs = sum(kind == "d" for _, kind, _ in listed)
            nlink = st.st_nlink in (1, 2 + subdirs) or st.st_nlink
            entry += [nlink, sorted(t[:2] for t in listed)]
            dinos.update({f"{rel}/{name}" if rel else name: ino for name, _, ino in listed})
        else:
            entry += [st.st_size, st.st_nlink]
            inos.setdefault(st.st_ino, []).append(rel)
        if kind == stat.S_IFREG:
            entry.append(path.read_bytes())
        elif kind == stat.S_IFLNK:
            entry.append(os.readlink(path))
        else:
            entry.append(os.major(st.st_rdev) if kind in (stat.S_IFCHR, stat.S_IFBLK) else None)
        if kind != stat.S_IFLNK:
            entry.append(sorted((x, os.getxattr(path, x)) for x in os.listxattr(path)))
        if rel and dinos[rel] != st.st_ino:
            d_ino_wrong.append(rel)
        out[rel or "/"] = tuple(entry)
        if kind == stat.S_IFDIR:
            for name in sorted(names):
                walk(f"{rel}/{name}" if rel else name)

    walk("")
    # Which names are one file (hard links), not the numbers themselves.
    for group in inos.values():
        if len(group) > 1:
            out["links:" + group[0]] = tuple(sorted(group))
    return out


def _dtype(entry: os.DirEntry) -> str:
    if entry.is_symlink():
        return "l"
    return "d" if entry.is_dir() else "f" if entry.is_file() else "o"


# --- operations -------------------------------------------------------------


def _op(what: str, fn: Callable[[Path], object]) -> Callable[[Path], object]:
    fn.what = what  # type: ignore[attr-defined]
    return fn


def write_at(rel: str, data: bytes, offset: int = 0, flags: int = os.O_WRONLY):
    def run(root: Path):
        fd = os.open(root / rel, flags | os.O_NONBLOCK)  # a FIFO: ENXIO, not a hang
        try:
            return os.pwrite(fd, data, offset) if offset >= 0 else os.write(fd, data)
        finally:
            os.close(fd)

    return _op(f"write {rel} {flags:#o}", run)


def append(rel: str, data: bytes):
    return write_at(rel, data, -1, os.O_WRONLY | os.O_APPEND)


def read_nonblock(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def create(rel: str, data: bytes):
    return write_at(rel, data, 0, os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def ops_on(rel: str, rel2: str, rng: random.Random) -> list[Callable[[Path], object]]:
    data = bytes([rng.randrange(97, 123)]) * rng.randrange(1, 20)
    return [
        write_at(rel, data, rng.randrange(0, 12)),
        append(rel, data),
        write_at(rel, data, 0, os.O_WRONLY | os.O_TRUNC),
        create(rel, data),
        _op(f"truncate {rel}", lambda r: os.truncate(r / rel, rng_size)),
        _op(f"chmod {rel}", lambda r: os.chmod(r / rel, 0o640)),
        _op(f"chown {rel}", lambda r: os.chown(r / rel, 42, 43, follow_symlinks=False)),
        _op(f"utime {rel}", lambda r: os.utime(r / rel, ns=(5, 7), follow_symlinks=False)),
        _op(f"setxattr {rel}", lambda r: os.setxattr(r / rel, "user.t", data)),
        _op(f"removexattr {rel}", lambda r: os.removexattr(r / rel, "user.k")),
        _op(f"unlink {rel}", lambda r: os.unlink(r / rel)),
        _op(f"rmdir {rel}", lambda r: os.rmdir(r / rel)),
        _op(f"mkdir {rel}", lambda r: os.mkdir(r / rel, 0o755)),
        _op(f"symlink {rel}", lambda r: os.symlink(rel2, r / rel)),
        _op(f"rename {rel} {rel2}", lambda r: os.rename(r / rel, r / rel2)),
        _op(f"link {rel} {rel2}", lambda r: os.link(r / rel, r / rel2, follow_symlinks=False)),
        _op(f"read {rel}", lambda r: read_nonblock(r / rel)),
        exchange(rel, rel2),
        exchange(rel, rel2, RENAME_NOREPLACE),
        _op(f"mkfifo {rel}", lambda r: os.mkfifo(r / rel, 0o600)),
        write_at(rel, data, 0, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        as_user(write_at(rel, data, 0)),
        as_user(_op(f"unlink {rel}", lambda r: os.unlink(r / rel))),
        as_user(_op(f"chmod {rel}", lambda r: os.chmod(r / rel, 0o4700))),
        as_user(_op(f"utime {rel}", lambda r: os.utime(r / rel))),
        _op(f"listdir {rel}", lambda r: sorted(os.listdir(r / rel))),
    ]


rng_size = 3


def exchange(rel: str, rel2: str, flags: int = RENAME_EXCHANGE):
    def run(root: Path):
        code = renameat2(root / rel, root / rel2, flags)
        if code:
            raise OSError(code, os.strerror(code))

    return _op(f"renameat2 {rel} {rel2} {flags}", run)


def as_user(op, uid: int = 1234, gid: int = 5678):
    """``op`` run by another user, in a child; its errno, or 0."""

    def run(root: Path):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                os.chdir(root)  # pytest's directories above are 0700
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                op(Path("."))
            except OSError as exc:
                code = exc.errno or 255
            except BaseException:
                code = 254
            os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code:
            raise OSError(code, os.strerror(code))

    return _op(f"as {uid}: {op.what}", run)


# --- scripted cases -----------------------------------------------------------


def test_the_lowers_look_the_same(twins):
    twins.same_tree("fresh")
    twins.remount()
    twins.same_tree("fresh, remounted")


def test_copy_up_of_every_kind_of_change(twins):
    for step in (
        write_at("f", b"X", 3),
        append("g", b"appended\n"),
        _op("truncate", lambda r: os.truncate(r / "d/a", 4)),
        _op("chmod", lambda r: os.chmod(r / "d/b", 0o600)),
        _op("chown", lambda r: os.chown(r / "owned", 7, 8)),
        _op("utime", lambda r: os.utime(r / "d/sub/deep", ns=(10**9, 3 * 10**9))),
        _op("setxattr", lambda r: os.setxattr(r / "m/low", "user.n", b"1")),
        _op("chmod dir", lambda r: os.chmod(r / "empty", 0o700)),
        _op("setxattr dir", lambda r: os.setxattr(r / "d", "user.dir", b"yes")),
        write_at("m/high", b"new", 0, os.O_WRONLY | os.O_TRUNC),
    ):
        twins.both(step)
        twins.same_tree(step.what)
    times = [os.stat(r / "d/sub/deep").st_mtime_ns for r in twins.roots]
    assert times == [3 * 10**9] * 2
    owned = [os.stat(r / "owned") for r in twins.roots]
    # chown by root clears set-uid on both.
    assert [stat.S_IMODE(s.st_mode) for s in owned] == [stat.S_IMODE(owned[0].st_mode)] * 2
    twins.remount()
    twins.same_tree("remounted")


def test_delete_and_recreate_over_whiteouts(twins):
    for step in (
        _op("unlink lower", lambda r: os.unlink(r / "f")),
        _op("recreate file", lambda r: (r / "f").write_bytes(b"again\n")),
        _op("unlink in merged", lambda r: os.unlink(r / "m/low")),
        _op("mkdir over whiteout", lambda r: os.mkdir(r / "m/low")),
        _op("rmdir nonempty lower", lambda r: os.rmdir(r / "d")),
        _op("rmdir merged, lower names hidden", lambda r: os.rmdir(r / "m")),
        _op("unlink m/high", lambda r: os.unlink(r / "m/high")),
        _op("rmdir m/low", lambda r: os.rmdir(r / "m/low")),
        _op("rmdir merged, now empty", lambda r: os.rmdir(r / "m")),
        _op("mkdir over a deleted merged dir", lambda r: os.mkdir(r / "m")),
        _op("list it", lambda r: os.listdir(r / "m")),
        _op("rmdir lower empty", lambda r: os.rmdir(r / "empty")),
        _op("symlink over whiteout", lambda r: os.symlink("x", r / "empty")),
        _op("opaque dir listing", lambda r: sorted(os.listdir(r / "op"))),
        _op("whited-out dir", lambda r: os.listdir(r / "wd")),
        _op("mkdir over lower whiteout", lambda r: os.mkdir(r / "wd")),
        _op("rmdir opaque", lambda r: os.rmdir(r / "op")),
    ):
        twins.both(step)
        twins.same_tree(step.what)
    twins.remount()
    twins.same_tree("remounted")


def test_renames_and_hard_links(twins):
    for step in (
        _op("rename lower file", lambda r: os.rename(r / "f", r / "f2")),
        _op("rename over lower", lambda r: os.rename(r / "f2", r / "d/a")),
        _op("rename lower dir", lambda r: os.rename(r / "d", r / "d2")),
        _op("rename merged dir", lambda r: os.rename(r / "m", r / "d2/m")),
        _op("rename dir onto nonempty", lambda r: os.rename(r / "empty", r / "op")),
        _op("rename dir onto empty", lambda r: os.rename(r / "op", r / "empty")),
        _op("link lower", lambda r: os.link(r / "g", r / "g-link")),
        _op("write via link", lambda r: (r / "g-link").write_bytes(b"through link\n")),
        _op("write lower hard link", write_at("hl1", b"HL", 0)),
        _op("rename lower hard link", lambda r: os.rename(r / "d2/hl2", r / "hl3")),
        _op("unlink lower hard link", lambda r: os.unlink(r / "hl1")),
        _op("symlink", lambda r: os.symlink("d2/m/high", r / "s")),
        _op("read through symlink", lambda r: (r / "s").read_bytes()),
    ):
        twins.both(step)
        twins.same_tree(step.what)
    twins.remount()
    twins.same_tree("remounted")


def test_a_read_only_fd_sees_a_copy_up_by_another(twins):
    # Before Linux 4.19 a file opened for reading in a lower kept reading the
    # lower after another descriptor copied it up; since then overlayfs (and
    # the union, which keeps one inode per name) shows every fd the new data.
    def run(root: Path):
        ro = os.open(root / "f", os.O_RDONLY)
        try:
            before = os.pread(ro, 100, 0)
            with open(root / "f", "r+b") as rw:
                rw.write(b"NEW")
            return before, os.pread(ro, 100, 0), os.fstat(ro).st_size
        finally:
            os.close(ro)

    twins.both(_op("ro fd then copy-up", run))


def test_open_files_across_unlink_rename_and_copy_up(twins):
    def run(root: Path):
        seen = []
        ro = os.open(root / "d/a", os.O_RDONLY)
        rw = os.open(root / "d/b", os.O_RDWR)
        os.unlink(root / "d/a")
        seen.append(os.pread(ro, 100, 0))  # an unlinked lower file still reads
        os.rename(root / "d", root / "moved")
        os.pwrite(rw, b"B", 0)  # copy-up through an fd of a renamed directory
        seen.append((root / "moved/b").read_bytes())
        os.fchmod(rw, 0o600)
        seen.append(stat.filemode(os.stat(root / "moved/b").st_mode))
        os.unlink(root / "moved/b")
        os.pwrite(rw, b"C", 1)  # written after its last name went
        seen.append((os.pread(rw, 100, 0), os.fstat(rw).st_nlink))
        os.close(ro)
        os.close(rw)
        return seen

    twins.both(_op("open files", run))
    twins.same_tree("after")
    twins.remount()
    twins.same_tree("remounted")


def test_times_and_set_id_bits_through_copy_up(twins):
    def run(root: Path):
        lower, f = os.stat(root / "owned"), os.stat(root / "f")
        os.chmod(root / "f", 0o600)  # metadata-only copy-up keeps the times
        os.setxattr(root / "owned", "user.x", b"1")
        after = os.stat(root / "owned")
        return (
            os.stat(root / "f").st_mtime_ns == f.st_mtime_ns,
            (after.st_mtime_ns, after.st_atime_ns) == (lower.st_mtime_ns, lower.st_atime_ns),
            stat.filemode(after.st_mode),
        )

    twins.both(_op("times", run))
    # The owner writing a set-uid file drops the bit (the kernel asks the
    # filesystem to: file_remove_privs).
    twins.both(as_user(write_at("owned", b"W", 0)))
    twins.both(_op("mode", lambda r: stat.filemode(os.stat(r / "owned").st_mode)))
    twins.remount()
    twins.same_tree("remounted")


def test_readdir_while_changing(twins):
    def run(root: Path):
        seen = []
        with os.scandir(root / "d") as it:
            for i, entry in enumerate(it):
                seen.append(entry.name)
                if i == 0:
                    os.unlink(root / "d/b") if entry.name != "b" else os.unlink(root / "d/a")
                    (root / "d/new").write_bytes(b"")
        assert len(seen) == len(set(seen)), seen
        return sorted(set(seen) - {"new", "a", "b"})

    twins.both(_op("readdir while changing", run))
    twins.same_tree("after")


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}[platform.machine()]


def getdents(fd: int, size: int = 96) -> list[tuple[bytes, int]]:
    """One getdents64(2) call with a small buffer: [(name, d_off)]."""
    buf = ctypes.create_string_buffer(size)
    n = _libc.syscall(_SYS_GETDENTS64, fd, buf, size)
    if n < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    out, pos = [], 0
    while pos < n:
        off, reclen = struct.unpack_from("<qH", buf.raw, pos + 8)
        name = buf.raw[pos + 19 : pos + reclen].split(b"\0", 1)[0]
        out.append((name, off))
        pos += reclen
    return out


def test_seekdir_while_names_come_and_go(twins):
    # POSIX: a name neither removed nor added since the directory was opened
    # is listed exactly once, also across lseek to an offset it returned.
    # (overlayfs lists a merged directory from a copy taken at open, so the
    # two need not agree on the names that changed: only the rule is checked.)
    def run(root: Path):
        names = [f"n{i:02}".encode() for i in range(30)]
        for name in names:
            (root / "m" / name.decode()).write_bytes(b"")
        fd = os.open(root / "m", os.O_RDONLY | os.O_DIRECTORY)
        try:
            first = getdents(fd)
            while len(first) < 4:
                first += getdents(fd)
            for gone in (names[5], names[20], b"low"):
                os.unlink(root / "m" / gone.decode())
            for i in range(10):
                (root / f"m/new{i}").write_bytes(b"")
            os.lseek(fd, first[2][1], os.SEEK_SET)  # back to after the 3rd entry
            seen = [name for name, _ in first[:3]]
            while chunk := getdents(fd):
                seen += [name for name, _ in chunk]
        finally:
            os.close(fd)
        stayed = {*names, b".", b"..", b"high"} - {names[5], names[20]}
        twice = {n for n in seen if seen.count(n) > 1}
        return sorted(stayed - set(seen)), sorted(twice)

    for root in twins.roots:
        assert run(root) == ([], []), root


def test_another_user_mmap_set_gid_and_sticky_directories(twins):
    def mmap_write(r):
        fd = os.open(r / "d/a", os.O_RDWR)
        m = mmap.mmap(fd, 0)
        m[0:3] = b"MMM"
        m.flush()
        m.close()
        os.close(fd)
        return (r / "d/a").read_bytes()

    steps = [
        _op("mmap", mmap_write),
        _op("chown d", lambda r: os.chown(r / "d", 1234, 5678)),
        as_user(create("d/u", b"u")),
        as_user(_op("mkdir", lambda r: os.mkdir(r / "d/ud"))),
        as_user(_op("rename", lambda r: os.rename(r / "d/b", r / "d/b2"))),
        _op("setgid m", lambda r: (os.chown(r / "m", 0, 5678), os.chmod(r / "m", 0o2777))),
        create("m/sg", b"x"),
        _op("mkdir m/sgd", lambda r: os.mkdir(r / "m/sgd")),
        _op("sticky", lambda r: os.chmod(r / "m", 0o1777)),
        as_user(_op("unlink other's in sticky", lambda r: os.unlink(r / "m/low"))),
        as_user(_op("rename other's in sticky", lambda r: os.rename(r / "m/high", r / "m/h2"))),
        as_user(create("m/mine", b"")),
        as_user(_op("unlink mine in sticky", lambda r: os.unlink(r / "m/mine"))),
        _op("rename self", lambda r: os.rename(r / "hl1", r / "d/hl2")),
        _op("ls", lambda r: sorted(os.listdir(r / "d"))),
        write_at("g", b"far", 100000),
        _op("size", lambda r: (os.stat(r / "g").st_size, os.stat(r / "g").st_blocks > 0)),
    ]
    for step in steps:
        twins.both(step)
    twins.same_tree("after")
    twins.remount()
    twins.same_tree("remounted")


# --- random sequences ---------------------------------------------------------

_NAMES = ["f", "g", "owned", "d", "d/a", "d/sub", "d/hl2", "m", "m/low", "m/high", "m/gone"]
_NAMES += ["op", "op/hidden", "op/shown", "wd", "hl1", "ln", "empty", "new", "d/new", "m/n2"]
_NAMES += ["d/sub/deep", "d2", "d2/a", "d2/sub", "m/low/x", "new/y", "wd/x", "empty/e", "hl3"]
_NAMES += ["d2/sub/deep", "d2/m", "d2/m/low", "m/d", "m/d/sub", "op/d", "d/sub/m", "x"]


# Three seeded sequences of 100 steps run in CI (a few seconds); a longer
# hunt: UNION_DIFF_SEEDS=0:200 (0-250 ran clean).
_FIRST, _, _END = os.environ.get("UNION_DIFF_SEEDS", "0:3").partition(":")


@pytest.mark.parametrize("seed", range(int(_FIRST), int(_END)))
def test_random_sequences(twins, seed):
    rng = random.Random(seed)
    for step in range(100):
        rel, rel2 = rng.choice(_NAMES), rng.choice(_NAMES)
        op = rng.choice(ops_on(rel, rel2, rng))
        twins.both(op)
        if step % 5 == 4:
            twins.same_tree(f"seed {seed} step {step} {op.what}")
        if step % 50 == 49:
            twins.remount()
    twins.same_tree(f"seed {seed}: remounted")
