"""What SEFS trusts: the state directory's place, the store's identity, every config field."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from conftest import run_cli

from occlumfs.errors import ExitCode
from occlumfs.keys import write_key_file
from sefs.helpers import Volume, make_volume

GOLDEN_V1 = Path(__file__).parent / "golden" / "v1"


def one_line(done, code: int) -> str:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


def _mount_fails(volume: Volume, mnt: Path, *args) -> object:
    return run_cli("mount", volume.dir, mnt, "--key-file", volume.key_file, *args, check=False)


# -- the state directory -------------------------------------------------------------------
@pytest.mark.fuse
@pytest.mark.parametrize("where", ["the store", "inside the store", "above the store"])
def test_state_dir_overlapping_the_store_is_refused(volume, tmp_path, spare_mnt, where):
    state = {
        "the store": volume.dir,
        "inside the store": volume.dir / "st",
        "above the store": volume.dir.parent,
    }[where]
    before = sorted(p.name for p in volume.dir.rglob("*"))
    for done in (
        run_cli(
            "fsck", volume.dir, "--key-file", volume.key_file, "--state-dir", state, check=False
        ),
        _mount_fails(volume, spare_mnt, "--state-dir", state),
    ):
        assert "outside the store" in one_line(done, ExitCode.USAGE)
    assert sorted(p.name for p in volume.dir.rglob("*")) == before
    done = run_cli(
        "sefs", "create", tmp_path / "new", "--key-file", volume.key_file,
        "--state-dir", tmp_path / "new" / "st", check=False,
    )  # fmt: skip
    one_line(done, ExitCode.USAGE)
    assert not (tmp_path / "new").exists()


def test_missing_state_dir_gets_only_its_last_component(volume, tmp_path):
    deep = tmp_path / "no" / "such" / "st"
    done = run_cli(*volume.fsck_args()[:4], "--state-dir", deep, check=False)
    assert "does not exist" in one_line(done, ExitCode.NOT_FOUND)
    assert not (tmp_path / "no").exists()
    fresh = tmp_path / "fresh-state"
    assert run_cli(*volume.fsck_args()[:4], "--state-dir", fresh).returncode == 0
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert sorted(p.suffix for p in fresh.iterdir()) == [".json", ".pin"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"counter": Infinity, "root_tag": "00", "mac": "00"}',
        '{"counter": -1, "root_tag": "00", "mac": "00"}',
        '{"counter": 1, "root_tag": "zz", "mac": "00"}',
        '{"counter": 1, "root_tag": "00", "mac": "\u00e9"}',
        '{"counter": 1, "root_tag": "00", "mac": 5}',
    ],
)
def test_garbled_commit_state_is_one_line(volume, text):
    assert run_cli(*volume.fsck_args()).returncode == 0
    (state_file,) = volume.state.glob("*.json")
    state_file.write_text(text)
    done = run_cli(*volume.fsck_args(), check=False)
    assert done.returncode == ExitCode.FSCK and "trusted state" in done.stdout, done
    assert done.stderr.count("\n") == 1


# -- the store's identity ----------------------------------------------------------------------
@pytest.mark.fuse
def test_a_different_store_at_a_known_path_is_refused_unless_accepted(volume, tmp_path, spare_mnt):
    assert run_cli(*volume.fsck_args()).returncode == 0
    # Another store made with the same key, copied over the first one wholesale.
    other = tmp_path / "other"
    run_cli("sefs", "create", other, "--key-file", volume.key_file, "--state-dir", tmp_path / "s2")
    shutil.rmtree(volume.dir)
    shutil.copytree(other, volume.dir)
    fsck = run_cli(*volume.fsck_args(), check=False)
    assert fsck.returncode == ExitCode.FSCK and "--accept-new-store" in fsck.stdout
    mount = _mount_fails(volume, spare_mnt, "--state-dir", volume.state)
    assert "--accept-new-store" in one_line(mount, ExitCode.INTEGRITY)
    assert run_cli(*volume.fsck_args(), "--accept-new-store").returncode == 0
    assert run_cli(*volume.fsck_args()).returncode == 0  # pinned to the new one from now on


def test_create_pins_the_new_store(tmp_path):
    volume = make_volume(tmp_path / "a")
    shutil.rmtree(volume.dir)
    done = run_cli("sefs", "create", volume.dir, "--key-file", volume.key_file,
                   "--state-dir", volume.state)  # fmt: skip
    assert done.returncode == 0  # the user made it here: no flag needed
    assert run_cli(*volume.fsck_args()).returncode == 0


# -- every field of sefs.json ----------------------------------------------------------------
def _edit_config(store: Path, edit) -> None:
    path = store / "sefs.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


HUGE_SCRYPT = {"n": 1 << 22, "r": 32, "p": 16}  # 16 GiB: refused before scrypt runs
FORGED = {
    "cipher": lambda c: c.update(cipher="NULL-CIPHER"),
    "block_size": lambda c: c.update(block_size=1),
    "block_size as text": lambda c: c.update(block_size="4096"),
    "unknown key": lambda c: c.update(compression="zstd"),
    "unknown wrap key": lambda c: c["wrap"].update(hint="abc"),
    "no block_size": lambda c: c.pop("block_size"),
    "1-byte nonce": lambda c: c["wrap"].update(nonce="00"),
    "version 5": lambda c: c.update(version=5),
    "version true": lambda c: c.update(version=True),
    "huge scrypt": lambda c: c["wrap"].update(kind="passphrase", scrypt=HUGE_SCRYPT),
}  # fmt: skip


@pytest.mark.fuse
@pytest.mark.parametrize("store", ["v2", "golden v1"])
@pytest.mark.parametrize("forgery", sorted(FORGED))
def test_forged_config_fields_are_refused(volume, tmp_path, spare_mnt, store, forgery):
    if store == "golden v1":
        shutil.copytree(GOLDEN_V1 / "fs", tmp_path / "v1")
        volume = Volume(tmp_path / "v1", GOLDEN_V1 / "key", b"", tmp_path / "v1-state")
    _edit_config(volume.dir, FORGED[forgery])
    for done in (
        run_cli("sefs", "info", volume.dir, check=False),
        run_cli(*volume.fsck_args(), check=False),
        _mount_fails(volume, spare_mnt, "--state-dir", volume.state),
    ):
        assert "sefs.json: malformed SEFS config" in one_line(done, ExitCode.FORMAT)


def test_every_v2_field_is_bound_to_the_key_wrap(volume, tmp_path):
    """A field that passes the checks but differs from what was wrapped: the unwrap fails."""
    _edit_config(volume.dir, lambda c: c.update(version=1))  # a downgrade to v1's weaker binding
    assert "wrong key" in one_line(run_cli(*volume.fsck_args(), check=False), ExitCode.WRONG_KEY)
    copy = make_volume(tmp_path / "pp")
    passphrase = tmp_path / "pass"
    passphrase.write_text("correct horse\n")
    new_key = tmp_path / "k2"
    write_key_file(new_key)
    run_cli(
        "sefs", "passwd", copy.dir, "--key-file", copy.key_file, "--new-passphrase-file", passphrase
    )
    _edit_config(copy.dir, lambda c: c["wrap"]["scrypt"].update(p=2))
    done = run_cli("fsck", copy.dir, "--passphrase-file", passphrase, "--state-dir", copy.state,
                   check=False)  # fmt: skip
    one_line(done, ExitCode.WRONG_KEY)


def test_passwd_keeps_a_v1_store_readable(tmp_path):
    shutil.copytree(GOLDEN_V1 / "fs", tmp_path / "v1")
    new_key = tmp_path / "k2"
    write_key_file(new_key)
    run_cli("sefs", "passwd", tmp_path / "v1", "--key-file", GOLDEN_V1 / "key",
            "--new-key-file", new_key)  # fmt: skip
    assert json.loads((tmp_path / "v1" / "sefs.json").read_text())["version"] == 1
    fsck = run_cli("fsck", tmp_path / "v1", "--key-file", new_key, "--state-dir", tmp_path / "st")
    assert fsck.returncode == 0
