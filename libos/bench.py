"""``python -m libos.bench``: occlum run against bubblewrap on a plain directory, one run.

Each workload runs inside an instance (verified image layer + encrypted SEFS
under the union, over FUSE, in the sandbox) and under ``bwrap`` with the same
namespaces on a plain directory holding the same files; the ratio is
inside / plain (lower is better), medians of ``--repeat`` runs. The sqlite
workload's peer is a gocryptfs mount (encrypted, FUSE) under bwrap.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

BWRAP = ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--cap-drop", "ALL"]
HELLO_C = '#include <stdio.h>\nint main(void) { puts("Hello World!"); return 0; }\n'
PY_IMPORT = "import json, email, http.client, sqlite3"
TRUE_LOOP = "i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done"
SQLITE_TXNS = 10_000
TARGETS = {"hello_world": 0.5}  # absolute seconds
RATIO_TARGETS = {"python_import": 1.5, "true_x1000": 1.5, "sqlite_txns": 1.0}


def _occlum(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "libos", *args], cwd=cwd, capture_output=True, check=True
    )


def _timed(cmd: list[str], cwd: Path | None = None, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _plain(root: Path, *command: str) -> list[str]:
    return [*BWRAP, "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp", *command]  # fmt: skip


def _instance(work: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "libos", "new", "inst"], cwd=work, check=True, capture_output=True
    )
    inst = work / "inst"
    (work / "hello.c").write_text(HELLO_C)
    subprocess.run(["musl-gcc", work / "hello.c", "-o", inst / "image/bin/hello_world"], check=True)
    shutil.copy2("/bin/busybox", inst / "image/bin/busybox")
    os.symlink("busybox", inst / "image/bin/true")
    os.symlink("busybox", inst / "image/bin/sh")
    pydir = Path("/usr/lib") / Path("/usr/bin/python3").resolve().name
    (work / "bom.yaml").write_text(
        "excludes: [__pycache__, test, idlelib, tkinter, turtledemo, ensurepip]\n"
        "targets:\n"
        "  - target: /bin\n    copy:\n      - files:\n"
        "          - /usr/bin/sqlite3\n"
        "          - {name: /usr/bin/python3, rename: python3}\n"
        f"  - target: /usr/lib\n    copy:\n      - dirs: [{pydir}]\n"
    )
    _occlum("copy-bom", "-f", str(work / "bom.yaml"), "--root", str(inst / "image"), cwd=work)
    # Compile the standard library once, as a distribution ships it: both sides read .pyc.
    subprocess.run(
        _plain(inst / "image", "/bin/python3", "-m", "compileall", "-q", str(pydir)),
        capture_output=True,
    )
    _occlum("build", cwd=inst)
    _occlum("run", "/bin/hello_world", cwd=inst)  # creates the writable layer
    return inst


def _sqlite_script(txns: int) -> str:
    inserts = "".join(f"BEGIN; INSERT INTO t VALUES ({i}); COMMIT;\n" for i in range(txns))
    return f"CREATE TABLE IF NOT EXISTS t(x);\n{inserts}"


def _sqlite_inside(inst: Path, script: str) -> float:
    (inst / "txns.sql").write_text(script)
    start = time.perf_counter()
    _occlum("run", "/bin/sqlite3", "/root/bench.db", ".read /host/txns.sql", cwd=inst)
    return time.perf_counter() - start


def _sqlite_gocryptfs(inst: Path, work: Path, script: str) -> float:
    cipher, plain = work / "gc-cipher", work / "gc-plain"
    cipher.mkdir()
    plain.mkdir()
    pw = work / "gc-pass"
    pw.write_text("benchmark passphrase\n")
    subprocess.run(["gocryptfs", "-init", "-q", "-passfile", pw, cipher], check=True)
    subprocess.run(["gocryptfs", "-q", "-nosyslog", "-passfile", pw, cipher, plain], check=True)
    try:
        (inst / "txns.sql").write_text(script)
        cmd = [*_plain(inst / "image"), "--bind", str(plain), "/root", "--bind", str(inst),
               "/host", "/bin/sqlite3", "/root/bench.db", ".read /host/txns.sql"]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - start
    finally:
        subprocess.run(["fusermount3", "-u", plain], check=False)


@click.command()
@click.option("--repeat", default=5, show_default=True, help="Runs per measurement (median).")
@click.option(
    "--sqlite-txns",
    "txns",
    default=SQLITE_TXNS,
    show_default=True,
    help="Single-row sqlite3 transactions (0: skip that workload).",
)
def main(repeat: int, txns: int) -> None:
    """Measure occlum run against bwrap on a plain directory; print times and ratios."""
    with tempfile.TemporaryDirectory(prefix="occlum-bench-") as tmp:
        work = Path(tmp)
        inst = _instance(work)
        image = inst / "image"
        rows = []
        inside = [sys.executable, "-m", "libos", "run"]
        for name, cmd in (
            ("hello_world", ["/bin/hello_world"]),
            ("python_import", ["/bin/python3", "-c", PY_IMPORT]),
            ("true_x1000", ["/bin/busybox", "sh", "-c", TRUE_LOOP]),
        ):
            rows.append(
                (
                    name,
                    _timed([*inside, *cmd], inst, repeat),
                    _timed(_plain(image, *cmd), None, repeat),
                )
            )
        if txns:
            script = _sqlite_script(txns)
            ours = _sqlite_inside(inst, script)
            rows.append(("sqlite_txns", ours, _sqlite_gocryptfs(inst, work, script)))
    click.echo(f"{'workload':<16}{'occlum s':>10}{'peer s':>10}{'ratio':>8}  target")
    for name, a, b in rows:
        target = (
            f"<= {TARGETS[name]} s absolute"
            if name in TARGETS
            else f"ratio <= {RATIO_TARGETS[name]}"
        )
        click.echo(f"{name:<16}{a:>10.3f}{b:>10.3f}{a / b:>8.2f}  {target}")


if __name__ == "__main__":
    main()
