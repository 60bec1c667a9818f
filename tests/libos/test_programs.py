"""Real programs copied in by a BOM with autodep, on the union: data persists, encrypted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)
from libos_fixtures import fuse_server_of, pty_expect, pty_shows

pytestmark = pytest.mark.fuse  # occlum run serves the rootfs over FUSE

# The host's (Debian's) python3 and its standard library, e.g. /usr/lib/python3.11.
HOST_PY = Path("/usr/lib") / Path("/usr/bin/python3").resolve().name

SQLITE_BOM = """\
targets:
  - target: /bin
    copy:
      - files:
          - /usr/bin/sqlite3
"""


def _ciphertext_only(store: Path, *needles: bytes) -> None:
    files = [p for p in store.rglob("*") if p.is_file()]
    assert files, "the store holds no files"
    for p in files:
        data = p.read_bytes()
        for needle in needles:
            assert needle not in data, (p, needle)


def test_sqlite3_database_persists_across_runs(tmp_path, occlum):
    occlum("new", "inst", cwd=tmp_path)
    inst = tmp_path / "inst"
    (tmp_path / "sqlite.yaml").write_text(SQLITE_BOM)
    occlum("-f", tmp_path / "sqlite.yaml", "--root", inst / "image", module="libos.bom")
    assert (inst / "image/bin/sqlite3").is_file()
    # autodep: the program's own interpreter listed its libraries
    assert (inst / "image/lib64/ld-linux-x86-64.so.2").is_file()
    assert any((inst / "image/lib").rglob("libsqlite3.so*"))
    occlum("build", cwd=inst)
    sql = "create table t(x text); insert into t values ('persisted-secret-row');"
    occlum("run", "/bin/sqlite3", "/root/db.sqlite", sql, cwd=inst)
    again = occlum("run", "/bin/sqlite3", "/root/db.sqlite", "select x from t;", cwd=inst)
    assert again.stdout == "persisted-secret-row\n"
    _ciphertext_only(inst / "run", b"persisted-secret-row", b"SQLite format 3", b"db.sqlite")


PYTHON_BOM = f"""\
excludes:
  - __pycache__
  - test
  - idlelib
  - tkinter
  - turtledemo
  - ensurepip
  - config-*
targets:
  - target: /bin
    copy:
      - files:
          - name: /usr/bin/python3
            rename: python3
  - target: /usr/bin
    createlinks:
      - src: /bin/python3
        linkname: python3
  - target: /usr/lib
    copy:
      - dirs:
          - {HOST_PY}
"""

PY_SCRIPT = """\
import json, sqlite3, hashlib, ssl, os, sys
data = {"digest": hashlib.sha256(b"x").hexdigest(), "ssl": ssl.OPENSSL_VERSION[:7]}
if sys.argv[1] == "write":
    with open("/root/state.json", "w") as f:
        json.dump(data, f)
    print("written")
else:
    with open("/root/state.json") as f:
        print(json.load(f) == data, sqlite3.sqlite_version_info >= (3,))
"""


def test_host_python3_imports_its_c_extensions_and_persists(tmp_path, occlum):
    occlum("new", "inst", cwd=tmp_path)
    inst = tmp_path / "inst"
    (tmp_path / "python.yaml").write_text(PYTHON_BOM)
    occlum("copy-bom", "-f", tmp_path / "python.yaml", "--root", inst / "image", cwd=tmp_path)
    dynload = inst / "image" / str(HOST_PY).lstrip("/") / "lib-dynload"
    assert any(dynload.glob("_ssl*.so"))
    # autodep inside copied directories: the C extensions' own libraries came too
    libs = {p.name.split(".so")[0] for p in (inst / "image").rglob("lib*.so*")}
    assert {"libssl", "libcrypto", "libsqlite3"} <= libs, libs
    (inst / "image/root/app.py").write_text(PY_SCRIPT)
    occlum("build", cwd=inst)
    assert occlum("run", "/bin/python3", "/root/app.py", "write", cwd=inst).stdout == "written\n"
    done = occlum("run", "/bin/python3", "/root/app.py", "read", cwd=inst)
    assert done.stdout == "True True\n"
    assert os.listdir(inst / "run/mount/__ROOT")


def test_data_written_by_busybox_persists_and_a_failed_commit_is_loud(built, occlum):
    occlum("run", "/bin/busybox", "sh", "-c", "echo kept > /root/note", cwd=built)
    done = occlum("run", "/bin/busybox", "cat", "/root/note", cwd=built)
    assert done.stdout == "kept\n"
    # The program removes the store under the server's feet (through /host):
    # the final commit cannot be written, and occlum run must say so.
    script = "rm -rf /host/run/mount/__ROOT; echo lost > /root/other; echo wrote"
    failed = occlum("run", "/bin/busybox", "sh", "-c", script, cwd=built, check=False)
    assert failed.stdout == "wrote\n"
    assert failed.returncode == 1
    assert "FAILED" in failed.stderr and "Traceback" not in failed.stderr


def test_user_data_survives_an_image_rebuild(built, occlum):
    script = (
        "echo mine > /root/x; echo 10.0.0.1 extra >> /etc/hosts; rm /etc/resolv.conf; "
        "mkdir -p /root/d && echo deep > /root/d/f"
    )
    occlum("run", "/bin/busybox", "sh", "-c", script, cwd=built)
    (built / "image/bin/added").write_text("new file\n")
    (built / "image/etc/hosts").write_text("127.0.0.1 rebuilt\n")
    occlum("build", cwd=built)
    assert any((built / "build/mount/__ROOT/previous").iterdir())  # kept for the move
    show = "cat /root/x /root/d/f /bin/added /etc/hosts; ls /etc/resolv.conf || echo gone"
    done = occlum("run", "/bin/busybox", "sh", "-c", show, cwd=built)
    assert "moved the writable layer onto this build" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["mine", "deep", "new file"]
    # The user's copy of /etc/hosts is theirs (copied up before the rebuild).
    assert "10.0.0.1 extra" in lines and "127.0.0.1 rebuilt" not in lines
    assert lines[-1] == "gone"  # a deletion stays a deletion
    assert not (built / "build/mount/__ROOT/previous").exists()
    again = occlum("run", "/bin/busybox", "cat", "/root/x", cwd=built)
    assert again.stdout == "mine\n" and "moved" not in again.stderr


def test_a_store_whose_build_is_gone_refuses_in_one_line(built, occlum):
    import shutil

    occlum("run", "/bin/busybox", "sh", "-c", "echo x > /root/x", cwd=built)
    (built / "image/bin/added").write_text("new file\n")
    occlum("build", cwd=built)
    shutil.rmtree(built / "build/mount/__ROOT/previous")
    done = occlum("run", "/bin/busybox", "cat", "/root/x", cwd=built, check=False)
    assert done.returncode == 13, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "another build of the image" in lines[0]


def _run_script_in_background(inst: Path, script: str):
    """``occlum run /bin/busybox sh -c SCRIPT`` in the background, with pipes for its stdio."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "libos", "run", "/bin/busybox", "sh", "-c", script],
        cwd=inst,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_killed_server_fails_the_run_loudly_and_the_next_run_recovers(built, occlum):
    import signal

    occlum("run", "/bin/busybox", "sh", "-c", "echo committed > /root/kept", cwd=built)
    proc = _run_script_in_background(built, "echo up; read x; echo lost > /root/lost; echo after")
    try:
        assert proc.stdout.readline() == b"up\n"
        os.kill(fuse_server_of(proc.pid), signal.SIGKILL)
        _out, err = proc.communicate(b"\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert "FAILED" in err.decode() and "Traceback" not in err.decode()
    # The dead mount was cleared and the last commit is intact.
    done = occlum("run", "/bin/busybox", "cat", "/root/kept", cwd=built)
    assert done.stdout == "committed\n"


def test_the_python3_repl_on_a_terminal(tmp_path, occlum):
    import pty
    import sys

    occlum("new", "inst", cwd=tmp_path)
    inst = tmp_path / "inst"
    (tmp_path / "python.yaml").write_text(PYTHON_BOM)
    occlum("copy-bom", "-f", tmp_path / "python.yaml", "--root", inst / "image", cwd=tmp_path)
    occlum("build", cwd=inst)
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.chdir(inst)
            argv = [sys.executable, "-m", "libos", "run", "/bin/python3", "-q"]
            os.execve(sys.executable, argv, dict(os.environ))
        finally:
            os._exit(127)
    seen = bytearray()
    try:
        pty_expect(fd, b">>> ", seen)
        os.write(fd, b"import ssl, os; print('tty', os.isatty(0), ssl.OPENSSL_VERSION[:7])\n")
        pty_expect(fd, b"tty True OpenSSL", seen)
        # The prompt is put together so that the echo of this line cannot match it.
        os.write(fd, b"input('wait' + 'ing> ')\n")
        pty_expect(fd, b"waiting> ", seen)
        # Ctrl-C reaches the REPL, not occlum run or bubblewrap. CPython's readline
        # prints the prompt before it waits for input, and a SIGINT between the two
        # is only noticed at the next key: a user types it again, and so does this.
        for _ in range(5):
            os.write(fd, b"\x03")
            if pty_shows(fd, b"KeyboardInterrupt", seen, timeout=5.0):
                break
        else:
            raise AssertionError(f"Ctrl-C never reached the REPL; got {bytes(seen)!r}")
        pty_expect(fd, b">>> ", seen)
        os.write(fd, b"raise SystemExit(7)\n")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 7
    finally:
        os.close(fd)
        if pid:
            os.waitpid(pid, 0)


def test_when_occlum_run_is_killed_the_server_still_commits(built, occlum):
    import select
    import signal

    proc = _run_script_in_background(built, "echo saved > /root/a; echo up; read x")
    try:
        assert proc.stdout.readline() == b"up\n"
        pidfd = os.pidfd_open(fuse_server_of(proc.pid))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ready, _, _ = select.select([pidfd], [], [], 60)  # the server ends on its own
        os.close(pidfd)
        assert ready, "the server outlived occlum run"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    done = occlum("run", "/bin/busybox", "cat", "/root/a", cwd=built)
    assert done.stdout == "saved\n"
