"""CPU of SEFS's fsync path, in process: what Python does per fsync, the disk left out.

    python bench/sefs_fsync_cpu.py [--fsyncs 3000] [--repeat 5] [--real-datasync]

Opens a fresh SEFS with ``open_sefs_fs`` in a temporary directory and, as a
sqlite transaction does to its journal and database, writes 100 bytes into
block 0 and 4 KiB into block 6 of one file and fsyncs it, ``--fsyncs`` times
per repetition. The host ``fdatasync`` of the log is stubbed out unless
``--real-datasync``: without it the number is the CPU of the path alone, which
a busy disk does not move. Prints the median and every repetition, in µs per
write + write + fsync. docs/performance.md, "SEFS fsync: what Python does per
fsync", has runs of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from occlumfs.fs import Caller
from occlumfs.keys import generate_key
from occlumfs.sefs import create_sefs, credential, open_sefs_fs
from occlumfs.sefs.storage import DiskStorage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsyncs", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--real-datasync", action="store_true")
    args = parser.parse_args()
    if not args.real_datasync:
        DiskStorage.datasync = lambda self, name: None  # type: ignore[method-assign]
    key = generate_key()
    with tempfile.TemporaryDirectory(prefix="sefs-fsync-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        create_sefs(root / "store", credential(key, None, None), state_dir=root / "state")
        fs = open_sefs_fs(root / "store", key=key, state_dir=root / "state")
        try:
            fs.kernel_keeps_file_times()  # as under FUSE with the writeback cache
            fh, _ = fs.create(1, b"db", 0o100644, os.O_RDWR, Caller())
            page = os.urandom(4096)
            for block in range(8):
                fs.write(fh, block * 4096, page)
            fs.fsync(fh, False)
            per_call = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                for _ in range(args.fsyncs):
                    fs.write(fh, 0, page[:100])
                    fs.write(fh, 6 * 4096, page)
                    fs.fsync(fh, False)
                per_call.append((time.perf_counter() - start) / args.fsyncs * 1e6)
            fs.release(fh)
        finally:
            fs.close()
    runs = " ".join(f"{x:.1f}" for x in per_call)
    print(f"write + write + fsync: median {statistics.median(per_call):.1f} us ({runs})")


if __name__ == "__main__":
    main()
