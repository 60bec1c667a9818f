"""Real programs copied in by a BOM with autodep, on the union: data persists, encrypted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)

# Every program runs on the instance's union rootfs, served over FUSE.
pytestmark = pytest.mark.fuse

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


def test_an_image_rebuild_under_an_old_store_refuses_in_one_line(built, occlum):
    occlum("run", "/bin/busybox", "sh", "-c", "echo x > /root/x", cwd=built)
    (built / "image/bin/added").write_text("new file\n")
    occlum("build", cwd=built)
    done = occlum("run", "/bin/busybox", "cat", "/root/x", cwd=built, check=False)
    assert done.returncode == 13, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "another build of the image" in lines[0]
