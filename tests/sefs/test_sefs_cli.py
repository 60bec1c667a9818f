"""The SEFS commands as a user types them: create, info, passwd, fsck, mount and its lock."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli

from occlumfs.cli import main
from occlumfs.errors import ExitCode
from occlumfs.mount import mounted_paths, wait_for_exit
from sefs.helpers import force_unmount, server_pid


@pytest.mark.fuse
def test_create_mount_write_read(tmp_path, mount):
    key = tmp_path / "k"
    run_cli("keygen", key)
    done = run_cli("sefs", "create", tmp_path / "fs", "--key-file", key)
    assert "created SEFS" in done.stderr
    with mount(tmp_path / "fs", "--key-file", key) as mnt:
        (mnt / "a").write_bytes(b"hello")
        os.mkdir(mnt / "d")
    with mount(tmp_path / "fs", "--type", "sefs", "--key-file", key, "--ro") as mnt:
        assert (mnt / "a").read_bytes() == b"hello"
        with pytest.raises(OSError) as err:
            (mnt / "b").write_bytes(b"x")
        assert err.value.errno == errno.EROFS
    assert run_cli("fsck", tmp_path / "fs", "--key-file", key).returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--key-file", "missing.key"],  # key file missing
        [],  # no key and no terminal
    ],
)
def test_create_failures_leave_nothing_behind(tmp_path, args):
    args = [str(tmp_path / a) if a.endswith(".key") else a for a in args]
    done = run_cli("sefs", "create", tmp_path / "fs", *args, check=False)
    assert done.returncode in (ExitCode.USAGE, ExitCode.NOT_FOUND)
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_create_refuses_a_non_empty_directory(tmp_path, volume):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    done = run_cli("sefs", "create", tmp_path / "busy", "--key-file", volume.key_file, check=False)
    assert done.returncode == ExitCode.USAGE and "not an empty directory" in done.stderr
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["x"]


@pytest.mark.parametrize("target", ["real", "nowhere"])
def test_create_at_a_symlink_is_refused_and_leaves_nothing(tmp_path, volume, target):
    # Every command refuses a store reached through a symlink (the store
    # path is opened without following one): create must not make one there.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(target)
    done = run_cli("sefs", "create", tmp_path / "link", "--key-file", volume.key_file, check=False)
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert done.stderr.splitlines() == [
        f"occlumfs: error: {tmp_path / 'link'}: is a symlink; name the directory it points to"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "vol"]
    assert list((tmp_path / "real").iterdir()) == []


@pytest.mark.fuse
def test_info_needs_no_key_and_shows_no_secrets(volume, mount):
    with mount(*volume.mount_args()) as mnt:
        (mnt / "f").write_bytes(b"x" * 10000)
    done = run_cli("sefs", "info", volume.dir, "--json")
    facts = json.loads(done.stdout)
    assert facts["version"] == 4 and facts["commit_counter"] >= 2
    assert facts["key_kind"] == "key-file" and facts["data_files"] == 1
    config = json.loads((volume.dir / "sefs.json").read_text())
    assert config["wrap"]["wrapped_key"] not in done.stdout
    assert volume.key_file.read_text().strip() not in done.stdout
    text = run_cli("sefs", "info", volume.dir).stdout
    assert "commit_counter:" in text and "root:" in text


@pytest.mark.fuse
def test_passwd_rewraps_without_touching_data(volume, mount, tmp_path):
    with mount(*volume.mount_args()) as mnt:
        (mnt / "f").write_bytes(b"payload" * 1000)
    data_before = {p.name: p.read_bytes() for p in (volume.dir / "d").iterdir()}
    meta_before = {p.name: p.read_bytes() for p in (volume.dir / "m").iterdir()}
    phrase = tmp_path / "phrase"
    phrase.write_text("correct horse battery staple\n")
    run_cli(
        "sefs", "passwd", volume.dir, "--key-file", volume.key_file, "--new-passphrase-file", phrase
    )
    assert {p.name: p.read_bytes() for p in (volume.dir / "d").iterdir()} == data_before
    assert {p.name: p.read_bytes() for p in (volume.dir / "m").iterdir()} == meta_before
    done = run_cli("fsck", volume.dir, "--key-file", volume.key_file, check=False)
    assert done.returncode == ExitCode.WRONG_KEY
    with mount(volume.dir, "--passphrase-file", phrase, "--state-dir", volume.state) as mnt:
        assert (mnt / "f").read_bytes() == b"payload" * 1000
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    done = run_cli(
        "sefs",
        "passwd",
        volume.dir,
        "--passphrase-file",
        wrong,
        "--new-key-file",
        volume.key_file,
        check=False,
    )
    assert done.returncode == ExitCode.WRONG_KEY and "wrong key" in done.stderr


@pytest.mark.fuse
def test_create_with_a_passphrase_file(tmp_path, mount):
    phrase = tmp_path / "phrase"
    phrase.write_text("s3cret\n")
    run_cli("sefs", "create", tmp_path / "fs", "--passphrase-file", phrase)
    assert json.loads((tmp_path / "fs" / "sefs.json").read_text())["wrap"]["scrypt"]["n"] >= 1 << 14
    with mount(tmp_path / "fs", "--passphrase-file", phrase) as mnt:
        (mnt / "x").write_text("y")
    done = run_cli("fsck", tmp_path / "fs", "--passphrase-file", phrase)
    assert done.returncode == 0


@pytest.mark.fuse
def test_second_mount_is_refused_with_the_server_pid(volume, mount, tmp_path):
    with mount(*volume.mount_args()) as mnt:
        pid = server_pid(volume.dir)
        assert os.path.exists(f"/proc/{pid}") and pid != os.getpid()
        (tmp_path / "other").mkdir()
        done = run_cli("mount", *volume.mount_args(), tmp_path / "other", check=False)
        assert done.returncode == ExitCode.IN_USE
        assert f"in use by pid {pid}" in done.stderr
        done = run_cli("fsck", volume.dir, "--key-file", volume.key_file, check=False)
        assert done.returncode == ExitCode.IN_USE
        assert (mnt / ".").is_dir()


@pytest.mark.fuse
def test_lock_left_by_a_killed_server_is_recovered(volume, tmp_path, mount):
    mnt = tmp_path / "crashing"
    mnt.mkdir()
    run_cli("mount", *volume.mount_args(), mnt)
    try:
        (mnt / "kept").write_bytes(b"k")
        fd = os.open(mnt / "kept", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        dead = server_pid(volume.dir)
        os.kill(dead, signal.SIGKILL)
        assert wait_for_exit(dead, 30), "the killed server did not go away"
    finally:
        force_unmount(mnt)
    assert mnt.resolve() not in mounted_paths()
    assert (volume.dir / "lock").read_text().strip() == str(dead)
    with mount(*volume.mount_args()) as again:
        assert (again / "kept").read_bytes() == b"k"
        assert server_pid(volume.dir) != dead


def test_every_sefs_command_has_help():
    group = main.commands["sefs"]
    for name in ("create", "info", "passwd"):
        assert group.commands[name].help
        assert run_cli("sefs", name, "--help").stdout.strip()
    assert main.commands["fsck"].help
    assert "exit" in run_cli("fsck", "--help").stdout.lower()


def _run_on_a_terminal(args: list, answers: list[bytes], tmp_path) -> tuple[int, bytes]:
    """Run ``occlumfs ARGS`` on a pseudo-terminal, answering each prompt in turn.

    getpass turns echo off and flushes pending input when it prompts, so each
    answer is typed only once its prompt (ending in ": ") has appeared and the
    terminal has stopped echoing.
    """
    import fcntl
    import select
    import subprocess
    import sys
    import termios

    master, slave = os.openpty()

    def become_terminal_owner() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "occlumfs", *map(str, args)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=become_terminal_owner,
        env={**os.environ, "OCCLUMFS_RUNTIME_DIR": str(tmp_path / "run")},
    )
    os.close(slave)
    output = b""
    answered = 0
    pending = list(answers)
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, f"no output for 60 s; so far: {output!r}"
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the program exited and closed the terminal
                break
            if not chunk:
                break
            output += chunk
            # Answer a prompt once: the newline echoed after an answer must not
            # look like the next prompt (an early answer is flushed by getpass).
            if pending and output[answered:].rstrip().endswith(b":"):
                answered = len(output)
                deadline = time.monotonic() + 60
                while termios.tcgetattr(master)[3] & termios.ECHO:
                    assert time.monotonic() < deadline, "the prompt never turned echo off"
                    os.sched_yield()
                os.write(master, pending.pop(0))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(timeout=60)
    return code, output


@pytest.mark.fuse
def test_passphrase_prompts_on_a_terminal(tmp_path, mount):
    code, out = _run_on_a_terminal(
        ["sefs", "create", tmp_path / "fs"], [b"pw1\n", b"pw1\n"], tmp_path
    )
    assert code == 0, out
    assert b"Passphrase" in out and b"pw1" not in out  # asked, not echoed
    assert json.loads((tmp_path / "fs" / "sefs.json").read_text())["wrap"]["kind"] == "passphrase"
    (tmp_path / "mnt").mkdir()
    code, out = _run_on_a_terminal(
        ["mount", tmp_path / "fs", tmp_path / "mnt"], [b"pw1\n"], tmp_path
    )
    assert code == 0, out
    try:
        (tmp_path / "mnt" / "f").write_text("typed")
    finally:
        assert run_cli("umount", tmp_path / "mnt").returncode == 0
    phrase = tmp_path / "phrase"
    phrase.write_text("pw1\n")
    with mount(tmp_path / "fs", "--passphrase-file", phrase) as mnt:
        assert (mnt / "f").read_text() == "typed"


def test_sigterm_during_create_ends_it_like_ctrl_c_and_leaves_nothing(tmp_path):
    # `timeout`, `docker stop` and a cancelled CI job send SIGTERM: as for
    # mkimage, the half-made store is removed and the exit is 130.
    (tmp_path / "pass").write_bytes(b"a passphrase\n")
    (tmp_path / "host").mkdir()
    cmd = [sys.executable, "-m", "occlumfs", "sefs", "create", str(tmp_path / "host" / "fs")]
    cmd += ["--passphrase-file", str(tmp_path / "pass")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        # The scratch dir exists while scrypt derives the key (tens of ms).
        while not any((tmp_path / "host").iterdir()):
            assert proc.poll() is None, "create ended before its scratch dir was seen"
            os.sched_yield()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.decode().splitlines() == ["occlumfs: interrupted"]
    assert list((tmp_path / "host").iterdir()) == []


@pytest.mark.fuse
@pytest.mark.parametrize("nonempty", [[], ["--nonempty"]])
def test_a_state_dir_under_the_mountpoint_is_refused_before_anything(volume, spare_mnt, nonempty):
    # The mount would hide it: without --nonempty the state dir made inside
    # was then refused as the mountpoint's content; with it, every commit's
    # state write failed behind the mount (no rollback check, umount 17).
    state = spare_mnt / "state"
    done = run_cli(
        "mount", volume.dir, spare_mnt, "--key-file", volume.key_file,
        "--state-dir", state, *nonempty, check=False,
    )  # fmt: skip
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert done.stderr.splitlines() == [
        f"occlumfs: error: trusted state directory {state}: inside the mountpoint "
        f"{spare_mnt}, which the mount would hide; keep it outside"
    ]
    assert list(spare_mnt.iterdir()) == [] and not os.path.ismount(spare_mnt)
