"""Every attack of the threat model on the host files, each detected.

A pristine volume is built once through a real mount: /secret.txt written in
three versions (fsync'd, host files snapshotted after the first), plus other
files and directories. Each test tampers with a private copy, then checks that
the mount refuses or the read fails with EIO (naming the path in the server
log), and that fsck exits 26 naming the path.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import mounted, run_cli

from occlumfs.errors import ExitCode
from sefs.helpers import Volume, make_volume

# The pristine volume every test tampers with is written through a mount.
pytestmark = pytest.mark.fuse

SECRET_V1 = b"TOPSECRET-CONTENT-v1-" * 800
SECRET_V2 = b"TOPSECRET-CONTENT-v2-" * 800
SECRET_V3 = b"TOPSECRET-CONTENT-v3-" * 800
OTHER = b"OTHERDATA-" * 2000
NAME = "SECRETNAME-plans.txt"


@dataclass
class Pristine:
    volume: Volume
    v1_dir: Path  # a copy of the whole directory after version 1 was fsync'd
    v1_state: Path


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    base = tmp_path_factory.mktemp("pristine")
    volume = make_volume(base / "vol")
    with mounted(*volume.mount_args()[:1], base / "mnt", *volume.mount_args()[1:]) as mnt:
        (mnt / "dir" / "sub").mkdir(parents=True)
        (mnt / "dir" / NAME).write_bytes(b"the plans")
        (mnt / "other.bin").write_bytes(OTHER)
        (mnt / "secret.txt").write_bytes(SECRET_V1)
        _fsync_path(mnt / "secret.txt")
        shutil.copytree(volume.dir, base / "v1", ignore=shutil.ignore_patterns("lock"))
        # The server's state writer may be between writing and renaming its
        # temporary file: copy what is committed, never the temporary file.
        shutil.copytree(volume.state, base / "v1-state", ignore=shutil.ignore_patterns("*.tmp"))
        (mnt / "dir" / "sub" / "added-later").write_bytes(b"later")
        for version in (SECRET_V2, SECRET_V3):
            (mnt / "secret.txt").write_bytes(version)
            _fsync_path(mnt / "secret.txt")
    return Pristine(volume, base / "v1", base / "v1-state")


@pytest.fixture
def victim(pristine, tmp_path) -> Volume:
    return pristine.volume.copy(tmp_path / "victim")


def fsck(volume: Volume):
    return run_cli(*volume.fsck_args(), check=False)


def assert_fsck_names(volume: Volume, path: str) -> None:
    done = fsck(volume)
    assert done.returncode == ExitCode.FSCK, done.stdout + done.stderr
    assert any(line.startswith(path + ":") for line in done.stdout.splitlines()), done.stdout


def assert_read_fails_with_eio(volume: Volume, tmp_path: Path, path: str) -> None:
    log = tmp_path / "server.log"
    with mounted(
        volume.dir,
        tmp_path / "mnt",
        *volume.mount_args()[1:],
        log_file=log,
        allow_log_errors=True,
    ) as mnt:
        with pytest.raises(OSError) as err:
            (mnt / path.lstrip("/")).read_bytes()
        assert err.value.errno == errno.EIO
        assert (mnt / "dir" / NAME).read_bytes() == b"the plans"  # the rest still works
    text = log.read_text()
    assert f"{path}: block" in text, text


def assert_mount_refused(volume: Volume, tmp_path: Path, code=ExitCode.INTEGRITY) -> str:
    (tmp_path / "refused").mkdir()
    done = run_cli("mount", *volume.mount_args(), tmp_path / "refused", check=False)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    return done.stderr


def secret_files(volume: Volume) -> list[Path]:
    data = volume.data_file_of("secret.txt")
    return [p for p in (data, data.with_name(data.name + ".b")) if p.exists()]


def current_secret_file(volume: Volume) -> Path:
    # Each fsync appends to the log (format version 3); only the unmount commits.
    # v1 went to slot A; v2 and v3, written since the same commit, both to slot B.
    data = volume.data_file_of("secret.txt")
    return data.with_name(data.name + ".b")


# -- what the host can read -------------------------------------------------------
def test_host_files_hold_no_contents_or_names(pristine):
    stored = pristine.volume.host_files()
    stored.update({str(p): p.read_bytes() for p in pristine.volume.state.rglob("*") if p.is_file()})
    for name, data in stored.items():
        for secret in (b"TOPSECRET", b"OTHERDATA", b"SECRETNAME", b"the plans", b"added-later"):
            assert secret not in data, f"{secret!r} readable in host file {name}"
    assert fsck(pristine.volume).returncode == 0


# -- data tampering: the read fails with EIO, fsck names the file -------------------
def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def _swap_blocks(path: Path, a: int, b: int) -> None:
    data = bytearray(path.read_bytes())
    block_a, block_b = data[a * 4096 : (a + 1) * 4096], data[b * 4096 : (b + 1) * 4096]
    data[a * 4096 : (a + 1) * 4096], data[b * 4096 : (b + 1) * 4096] = block_b, block_a
    path.write_bytes(bytes(data))


def tamper_bit_flip(v: Volume, p: Pristine) -> None:
    _flip(current_secret_file(v), 4096 + 17)


def tamper_zeroed_block(v: Volume, p: Pristine) -> None:
    f = current_secret_file(v)
    data = bytearray(f.read_bytes())
    data[4096:8192] = bytes(4096)
    f.write_bytes(bytes(data))


def tamper_blocks_swapped_within(v: Volume, p: Pristine) -> None:
    _swap_blocks(current_secret_file(v), 0, 2)


def tamper_block_copied_across_files(v: Volume, p: Pristine) -> None:
    src = v.data_file_of("other.bin").read_bytes()[:4096]
    f = current_secret_file(v)
    data = bytearray(f.read_bytes())
    data[:4096] = src
    f.write_bytes(bytes(data))


def tamper_truncated(v: Volume, p: Pristine) -> None:
    f = current_secret_file(v)
    os.truncate(f, 4096 * 2)


def tamper_deleted(v: Volume, p: Pristine) -> None:
    for f in secret_files(v):
        f.unlink()


def tamper_files_swapped(v: Volume, p: Pristine) -> None:
    a, b = current_secret_file(v), v.data_file_of("other.bin")
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def tamper_file_renamed(v: Volume, p: Pristine) -> None:
    f = current_secret_file(v)
    f.rename(f.with_name("00000000000000ff"))


def tamper_file_rolled_back(v: Volume, p: Pristine) -> None:
    # The host's own older copy of the same file at the same place: valid AES-GCM
    # under the same associated data; only the tag pinned in the block map can tell.
    # (v1 lived in slot A; the AD binds inode and block, not the slot.)
    f = current_secret_file(v)
    shutil.copyfile(p.v1_dir / "d" / f.name.removesuffix(".b"), f)


@pytest.mark.parametrize(
    "tamper",
    [
        tamper_bit_flip,
        tamper_zeroed_block,
        tamper_blocks_swapped_within,
        tamper_block_copied_across_files,
        tamper_truncated,
        tamper_deleted,
        tamper_files_swapped,
        tamper_file_renamed,
        tamper_file_rolled_back,
    ],
    ids=lambda f: f.__name__.removeprefix("tamper_"),
)
def test_data_tampering_is_detected(pristine, victim, tmp_path, tamper):
    tamper(victim, pristine)
    assert_fsck_names(victim, "/secret.txt")
    assert_read_fails_with_eio(victim, tmp_path, "/secret.txt")


def test_swapped_files_are_both_named(pristine, victim):
    tamper_files_swapped(victim, pristine)
    done = fsck(victim)
    assert done.returncode == ExitCode.FSCK
    assert "/secret.txt:" in done.stdout and "/other.bin:" in done.stdout


# -- metadata tampering: the mount refuses ------------------------------------------
def _newest_pack(v: Volume) -> Path:
    return max((v.dir / "m").glob("*.pack"))


def meta_pack_bit_flip(v: Volume, p: Pristine) -> None:
    _flip(_newest_pack(v), 40)


def meta_pack_truncated(v: Volume, p: Pristine) -> None:
    pack = _newest_pack(v)
    os.truncate(pack, pack.stat().st_size - 1)


def meta_pack_deleted(v: Volume, p: Pristine) -> None:
    _newest_pack(v).unlink()


def meta_pack_replaced_by_older(v: Volume, p: Pristine) -> None:
    shutil.copyfile(max((p.v1_dir / "m").glob("*.pack")), _newest_pack(v))


def meta_head_bit_flip(v: Volume, p: Pristine) -> None:
    _flip(v.dir / "head", 30)


def meta_head_deleted(v: Volume, p: Pristine) -> None:
    (v.dir / "head").unlink()


def meta_directory_rolled_back(v: Volume, p: Pristine) -> None:
    # The metadata as it was at version 1 (before dir/sub/added-later), data as now.
    shutil.rmtree(v.dir / "m")
    shutil.copytree(p.v1_dir / "m", v.dir / "m")
    shutil.copyfile(p.v1_dir / "head", v.dir / "head")


@pytest.mark.parametrize(
    "tamper",
    [
        meta_pack_bit_flip,
        meta_pack_truncated,
        meta_pack_deleted,
        meta_pack_replaced_by_older,
        meta_head_bit_flip,
        meta_head_deleted,
        meta_directory_rolled_back,
    ],
    ids=lambda f: f.__name__.removeprefix("meta_"),
)
def test_metadata_tampering_refuses_the_mount(pristine, victim, tmp_path, tamper):
    tamper(victim, pristine)
    message = assert_mount_refused(victim, tmp_path)
    assert "occlumfs: error:" in message
    done = fsck(victim)
    assert done.returncode == ExitCode.FSCK and done.stdout.strip(), done.stderr


def test_whole_directory_rollback_is_caught_by_the_trusted_state(pristine, tmp_path):
    old = Volume(
        tmp_path / "old", pristine.volume.key_file, pristine.volume.key, pristine.volume.state
    )
    shutil.copytree(pristine.v1_dir, old.dir)
    message = assert_mount_refused(old, tmp_path)
    assert "rolled back" in message
    assert fsck(old).returncode == ExitCode.FSCK


def test_whole_directory_rollback_without_trusted_state_is_undetectable(pristine, tmp_path):
    # Documented limitation (docs/formats/sefs.md): a consistent older snapshot on a
    # machine without the trusted state is the filesystem as it was.
    old = Volume(
        tmp_path / "old", pristine.volume.key_file, pristine.volume.key, tmp_path / "fresh-state"
    )
    shutil.copytree(pristine.v1_dir, old.dir)
    with mounted(old.dir, tmp_path / "mnt", *old.mount_args()[1:]) as mnt:
        assert (mnt / "secret.txt").read_bytes() == SECRET_V1
        assert not (mnt / "dir" / "sub" / "added-later").exists()
    # Trust on first use: the mount pinned what it saw, so from now on an even
    # older snapshot would be refused on this machine.
    assert len(list((tmp_path / "fresh-state").glob("*.json"))) == 1


def test_tampered_trusted_state_is_refused(pristine, victim, tmp_path):
    (state_file,) = victim.state.glob("*.json")
    state_file.write_text(state_file.read_text().replace('"counter": ', '"counter": 1'))
    message = assert_mount_refused(victim, tmp_path)
    assert "trusted state" in message


# -- keys ------------------------------------------------------------------------------
def test_wrong_key_is_one_clear_line(pristine, victim, tmp_path):
    wrong = tmp_path / "wrong.key"
    run_cli("keygen", wrong)
    (tmp_path / "mnt").mkdir()
    for args in (
        ["mount", victim.dir, tmp_path / "mnt", "--key-file", wrong],
        ["fsck", victim.dir, "--key-file", wrong],
    ):
        done = run_cli(*args, check=False)
        assert done.returncode == ExitCode.WRONG_KEY
        assert done.stderr.strip() == f"occlumfs: error: {victim.dir}: wrong key"


def test_edited_config_is_refused(pristine, victim, tmp_path):
    config = victim.dir / "sefs.json"
    text = config.read_text()
    fs_id = text.split('"fs_id": "')[1][:32]
    config.write_text(text.replace(fs_id, fs_id[::-1]))
    assert_mount_refused(victim, tmp_path, code=ExitCode.WRONG_KEY)


def test_fsck_names_the_paths_a_damaged_metadata_page_takes_with_it(tmp_path):
    from occlumfs.fs import ROOT_INO
    from sefs.helpers import ROOT, make_volume, write_file

    volume = make_volume(tmp_path / "many")
    fs = volume.open()
    for d in range(4):
        parent = fs.mkdir(ROOT_INO, b"dir%d" % d, 0o755, ROOT).ino
        for i in range(600):
            write_file(fs, parent, b"file-%04d-" % i + b"n" * 60, b"%d" % i)
    fs.close()
    fs = volume.open(read_only=True)
    pages = list(fs._pages.table)
    fs.close()
    assert len(pages) > 4
    # Damage a page in the middle of the key space (directory entries or inodes).
    ref = pages[len(pages) // 2]
    _flip(volume.dir / "m" / f"{ref.pack:016x}.pack", ref.offset + 40)
    (tmp_path / "refused").mkdir()
    done = run_cli("mount", *volume.mount_args(), tmp_path / "refused", check=False)
    assert done.returncode == ExitCode.INTEGRITY and "metadata page" in done.stderr
    done = fsck(volume)
    assert done.returncode == ExitCode.FSCK
    lines = done.stdout.splitlines()
    assert any("authentication failed" in line for line in lines)
    named = [line for line in lines if line.startswith("/dir")]
    assert named, done.stdout  # the files or directories that lost records, by path
