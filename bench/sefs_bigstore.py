"""Make a SEFS of many small files in-process (no FUSE), and measure the memory of opening it.

    python -m bench.sefs_bigstore make DIR --files 100000 --dirs 100
    python -m bench.sefs_bigstore open DIR [--walk]

``make`` writes a key file ``DIR.key`` (usable with ``--key-file``) and a
state dir ``DIR.state`` beside the store; ``open`` opens it with them and
prints one JSON line: the open time and the process's VmRSS/VmHWM (kB, from
/proc/self/status) after the open and, with ``--walk``, after listing every
directory (with attributes) and reading every file, as ``ls -lR`` plus
``cat`` of each file would through a mount.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from pathlib import Path

from occlumfs.fs import ROOT_INO, Caller
from occlumfs.keys import load_key_file, write_key_file
from occlumfs.sefs import create_sefs, open_sefs_fs
from occlumfs.sefs.keys import Credential

ROOT = Caller()


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
    return out


def make(store: Path, files: int, dirs: int, size: int) -> None:
    key = write_key_file(Path(f"{store}.key"))
    state = Path(f"{store}.state")
    state.mkdir(exist_ok=True)
    create_sefs(store, Credential(key=key), state_dir=state)
    fs = open_sefs_fs(store, key=key, state_dir=state)
    try:
        payload = b"x" * size
        per_dir = -(-files // dirs)
        made = 0
        for d in range(dirs):
            parent = fs.mkdir(ROOT_INO, b"d%05d" % d, 0o755, ROOT).ino
            for i in range(min(per_dir, files - made)):
                fh, _ = fs.create(parent, b"f%07d" % i, 0o644, os.O_WRONLY, ROOT)
                fs.write(fh, 0, payload)
                fs.release(fh)
                made += 1
            if d % 10 == 9:
                fs.commit()
    finally:
        fs.close()


def walk(fs) -> int:
    """Every directory listed with attributes, every file read; returns the files read."""
    count = 0
    todo = [ROOT_INO]
    while todo:
        ino = todo.pop()
        fh = fs.opendir(ino)
        for entry in fs.readdir(fh, 0):
            if stat.S_ISDIR(entry.attr.mode):
                todo.append(entry.attr.ino)
            elif stat.S_ISREG(entry.attr.mode):
                fs.lookup(ino, entry.name)
                f = fs.open(entry.attr.ino, os.O_RDONLY)
                fs.read(f, 0, 1 << 17)
                fs.release(f)
                count += 1
        fs.releasedir(fh)
    return count


def measure(store: Path, do_walk: bool) -> dict:
    key = load_key_file(Path(f"{store}.key"))
    result: dict = {"before": _status()}
    start = time.perf_counter()
    fs = open_sefs_fs(store, key=key, state_dir=Path(f"{store}.state"), read_only=True)
    result["open_s"] = round(time.perf_counter() - start, 3)
    result["after_open"] = _status()
    try:
        if do_walk:
            start = time.perf_counter()
            result["files_read"] = walk(fs)
            result["walk_s"] = round(time.perf_counter() - start, 3)
            result["after_walk"] = _status()
    finally:
        fs.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sefs_bigstore")
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("store", type=Path)
    mk.add_argument("--files", type=int, default=100_000)
    mk.add_argument("--dirs", type=int, default=100)
    mk.add_argument("--size", type=int, default=100)
    op = sub.add_parser("open")
    op.add_argument("store", type=Path)
    op.add_argument("--walk", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "make":
        make(args.store, args.files, args.dirs, args.size)
    else:
        json.dump(measure(args.store, args.walk), sys.stdout)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
