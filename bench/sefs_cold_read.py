"""SEFS's cold sequential read, in process: the host's disk and our decryption, no FUSE.

    python bench/sefs_cold_read.py [--mib 1024] [--repeat 3]   (as root: drops caches)

Builds a fresh SEFS with one file of ``--mib`` MiB in a temporary directory
under /var/tmp, then ``--repeat`` times reopens it read-only, drops the host's
page cache and reads the file in 1 MiB requests, as a mount's READs come.
Prints MiB/s and the process's CPU seconds per run. Run it from two
``git archive`` copies alternately to compare commits (docs/performance.md,
the read-ahead hints' entry).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from occlumfs.fs import Caller
from occlumfs.keys import generate_key
from occlumfs.sefs import create_sefs, credential, open_sefs_fs

MiB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    key = generate_key()
    with tempfile.TemporaryDirectory(prefix="sefs-read-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        store, state = root / "store", root / "state"
        create_sefs(store, credential(key, None, None), state_dir=state)
        fs = open_sefs_fs(store, key=key, state_dir=state)
        try:
            fh, attr = fs.create(1, b"f", 0o100644, os.O_RDWR, Caller())
            chunk = os.urandom(MiB)
            for i in range(args.mib):
                fs.write(fh, i * MiB, chunk)
            fs.fsync(fh, False)
            fs.release(fh)
        finally:
            fs.close()
        for _ in range(args.repeat):
            fs = open_sefs_fs(store, key=key, state_dir=state, read_only=True)
            try:
                fh = fs.open(attr.ino, os.O_RDONLY)
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                start, cpu = time.perf_counter(), time.process_time()
                for i in range(args.mib):
                    fs.read(fh, i * MiB, MiB)
                took = time.perf_counter() - start
                print(f"{args.mib / took:.0f} MiB/s, cpu {time.process_time() - cpu:.2f} s")
                fs.release(fh)
            finally:
                fs.close()


if __name__ == "__main__":
    main()
