"""SEFS crash soak: hundreds of crashes, each followed by the full recovery check.

    python -m bench.sefs_crash_soak [--power-cuts N] [--kills M] [--seed S]

Two kinds of crash, the same checks as tests/sefs/test_sefs_crash.py:

* power cuts, in-process: a random mixed workload on SEFS over simulated
  storage, the power cut at a random changing operation (mid-write,
  mid-commit, mid-rename of the head...), every write not fsync'd dropped;
* SIGKILL of a real mount's server at a random point of a workload that
  writes files whole (some by write-temp + fsync + rename + fsync dir).

After each: the filesystem opens, fsck is clean, and every fsync'd file holds
exactly its fsync'd content (or a version whose fsync was in flight). Prints
the number of crashes survived and every failure; exits 1 if any.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def power_cut_round(seed: int) -> None:
    from sefs.crashload import Workload, snapshot
    from sefs.helpers import SimVolume, fsck_problems
    from sefs.powerloss import PowerCut

    sim = SimVolume()
    rng = random.Random(seed)
    fs = sim.open(commit_interval=float("inf"))
    load = Workload(seed)
    load.in_flight = None
    sim.storage.cut_power_after(rng.randrange(1, 1500))
    try:
        for _ in range(rng.randrange(50, 800)):
            load.step(fs)
        load.fsync(fs)
    except PowerCut:
        pass
    sim.storage.power_loss()
    fs = sim.open()
    got = snapshot(fs)
    fs.close()
    allowed = [load.durable] + ([load.in_flight] if load.in_flight is not None else [])
    if got not in allowed:
        raise AssertionError("contents after the power cut match no committed state")
    problems = fsck_problems(sim.open)
    if problems:
        raise AssertionError("fsck: " + "; ".join(problems))


def kill_round(base: Path, seed: int) -> None:
    from sefs.helpers import make_volume
    from sefs.test_sefs_crash import kill_round as one_kill

    where = base / f"kill{seed}"
    volume = make_volume(where / "vol")
    one_kill(volume, where, seed, random.Random(seed).randrange(1, 60))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--power-cuts", type=int, default=300)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    failures: list[str] = []
    survived = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sefs-soak-") as tmp:
        os.environ.setdefault("OCCLUMFS_STATE_DIR", str(Path(tmp) / "state"))
        os.environ.setdefault("OCCLUMFS_RUNTIME_DIR", str(Path(tmp) / "run"))
        rounds = [("power cut", power_cut_round, args.seed + i) for i in range(args.power_cuts)]
        rounds += [
            ("SIGKILL", lambda s: kill_round(Path(tmp), s), args.seed + i)
            for i in range(args.kills)
        ]
        for kind, run, seed in rounds:
            try:
                run(seed)
                survived += 1
            except Exception as exc:
                failures.append(f"{kind} seed {seed}: {exc}")
                traceback.print_exc()
            if (survived + len(failures)) % 50 == 0:
                print(f"  {survived + len(failures)}/{len(rounds)} crashes", flush=True)
    elapsed = time.monotonic() - started
    print(
        f"sefs crash soak: {survived + len(failures)} crashes "
        f"({args.power_cuts} power cuts, {args.kills} SIGKILLs), {survived} recovered clean, "
        f"{len(failures)} failed, {elapsed:.0f} s, seed {args.seed}"
    )
    for line in failures:
        print("FAILED", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
