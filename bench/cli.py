"""``python -m bench [SUITE...]``: run the suites, print tables, log JSON lines.

Exit status: 0 when every row of ours was measured, 1 when any of ours failed
or was unavailable (peers that are missing only show as "unavailable"),
2 for a usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.report import SuiteReport, append_json_lines, render_markdown, render_text
from bench.stats import GiB, MiB, format_bytes, parse_size
from bench.system import (
    CacheDropper,
    disk_of,
    filesystem_type,
    force_unmount,
    git_commit,
    log,
    machine,
    mounted_paths,
    package_version,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SUITES = ("image", "sefs", "union", "soak")
PEER_PACKAGES = ("fuse-overlayfs", "gocryptfs", "securefs", "fio")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark occlumfs against its peers in one run; print ratios.",
    )
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"which suites to run: {', '.join(SUITES)} (default: all; soak when present)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="toy sizes (32 MiB, 200 stdlib files): checks the harness in ~2 min",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="the large size (file, tree, write); default 1G, 32M with --quick",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=3,
        help="repetitions per measurement, median reported (default 3, min 3)",
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=None,
        help="where to put inputs, backing stores and mountpoints (default: /var/tmp, on disk)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--stand-in",
        action="store_true",
        help="measure the in-memory memfs where our real subject is missing "
        "(harness validation only)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="directory for the JSON-lines log (default bench/results)",
    )
    parser.add_argument(
        "--only-harness",
        action="store_true",
        help="check the arithmetic and table rendering, measure nothing",
    )
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if args.reps < 3:
        parser.error("--reps must be at least 3: a median of fewer says little on a noisy host")
    if not args.suites:
        from bench.soak_suite import soak_available

        # The crash soak belongs to make bench whenever SEFS ships it.
        args.suites = [s for s in SUITES if s != "soak" or soak_available()]
    args.suites = list(dict.fromkeys(args.suites))
    if args.size is None:
        args.size = 32 * MiB if args.quick else GiB
    return args


def scratch_base(requested: Path | None) -> Path:
    """A disk-backed directory: tmpfs would make every 'cold' read a memory read."""
    if requested is not None:
        base = requested
    else:
        base = Path("/var/tmp")
        if not base.is_dir() or filesystem_type(base) in ("tmpfs", "ramfs"):
            base = RESULTS / "scratch"
    base.mkdir(parents=True, exist_ok=True)
    if filesystem_type(base) in ("tmpfs", "ramfs"):
        raise SystemExit(f"bench: {base} is on tmpfs; give --scratch on a disk filesystem")
    return base


def environment(scratch: Path) -> dict:
    return {
        **machine(),
        "disk": disk_of(scratch),
        "scratch_fs": filesystem_type(scratch),
        "git": git_commit(REPO),
        "peers": {name: package_version(name) for name in PEER_PACKAGES},
    }


def markdown_summary(
    command: str, env: dict, reports: list[SuiteReport], when: str, cold: bool
) -> str:
    out = [
        f"### Run of {when}",
        "",
        f"Command: `{command}` (git {env['git']})",
        "",
        f"Machine: {env['nproc']} cores ({env.get('cpu', 'unknown CPU')}), "
        f"{env.get('ram_gib', '?')} GiB RAM, Linux {env['kernel']}, scratch on {env['disk']}; "
        f"Python {env['python']}.",
        "Peers: " + "; ".join(f"{k} {v}" for k, v in env["peers"].items()) + ".",
    ]
    if not cold:
        out.append("**Caches could not be dropped (not root): every 'cold' row is warm.**")
    for report in reports:
        out += ["", render_markdown(report)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.only_harness:
        from bench.selfcheck import check, sample_report

        problems = check()
        print(render_text(sample_report()))
        for problem in problems:
            print(f"bench: self-check: {problem}", file=sys.stderr)
        print("bench: harness self-check " + ("FAILED" if problems else "ok"))
        return 1 if problems else 0

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # A terminated run still unmounts everything on its way out.
    signal.signal(signal.SIGTERM, interrupted)
    from bench.image_suite import run_image_suite
    from bench.measure import Settings
    from bench.sefs_suite import run_sefs_suite
    from bench.soak_suite import run_soak_suite
    from bench.union_suite import run_union_suite

    scratch = Path(tempfile.mkdtemp(prefix="occlumfs-bench-", dir=scratch_base(args.scratch)))
    # Mount records and server logs of our mounts stay with the run.
    os.environ["OCCLUMFS_RUNTIME_DIR"] = str(scratch / "run")
    # SEFS keeps its trusted rollback state outside the store: keep it in the run too.
    os.environ["OCCLUMFS_STATE_DIR"] = str(scratch / "state")
    log_dir = scratch / "logs"
    log_dir.mkdir()
    drop = CacheDropper()
    settings = Settings(
        scratch=scratch,
        quick=args.quick,
        reps=args.reps,
        size=args.size,
        stand_in=args.stand_in,
        drop_caches=drop,
        log_dir=log_dir,
    )
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    env = environment(scratch)
    started = dt.datetime.now(dt.UTC)
    when = started.strftime("%Y-%m-%d %H:%M UTC")
    run_id = started.strftime("%Y%m%dT%H%M%SZ")
    log(f"scratch {scratch}; large size {format_bytes(args.size)}; {args.reps} repetitions")

    runners = {
        "image": run_image_suite,
        "sefs": run_sefs_suite,
        "union": run_union_suite,
        "soak": run_soak_suite,
    }
    reports: list[SuiteReport] = []
    ours_failed = False
    compiled = byte_compile_ours()
    try:
        for name in args.suites:
            t0 = time.monotonic()
            try:
                report = runners[name](settings)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a broken suite must not hide the others' results
                log(f"suite {name} aborted: {exc!r}")
                report = SuiteReport(name, f"{name} suite")
                report.notes.append(f"suite aborted: {exc!r}")
                ours_failed = True
            report.notes.append(compiled)
            report.notes.append(f"suite took {time.monotonic() - t0:.0f} s")
            reports.append(report)
            print("\n" + render_text(report) + "\n", flush=True)
            ours_failed |= report.ours_failed()
            records = [
                {
                    "type": "run",
                    "run_id": run_id,
                    "time": when,
                    "command": command,
                    "suite": name,
                    "quick": args.quick,
                    "size": args.size,
                    "reps": args.reps,
                    "cold_caches": drop.works,
                    **env,
                }
            ]
            records += [
                {"type": "row", "run_id": run_id, "suite": name, **row.to_json()}
                for row in report.rows
            ]
            if report.summary:
                records.append(
                    {
                        "type": "summary",
                        "run_id": run_id,
                        "suite": name,
                        "summary": report.summary,
                        "failed": report.failed or None,
                    }
                )
            append_json_lines(args.results / "results.jsonl", records)
    finally:
        leftovers = [p for p in mounted_paths() if Path(p).is_relative_to(scratch)]
        for path in leftovers:  # never delete through a live mount
            log(f"unmounting leftover {path}")
            force_unmount(Path(path))
        if args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print("=" * 72)
    print("Markdown for docs/performance.md:\n")
    print(markdown_summary(command, env, reports, when, drop.works))
    log(f"results appended to {args.results / 'results.jsonl'}")
    if ours_failed:
        log("some occlumfs rows were not measured (see the notes): exit status 1")
    return 1 if ours_failed else 0


def byte_compile_ours() -> str:
    """Byte-compile the packages the timed commands import, as installing them does.

    Where PYTHONDONTWRITEBYTECODE is set (as in the development sessions), a
    checkout's modules are otherwise compiled again by every command: ~15 ms
    of each `occlumfs mkimage` (2026-11-28), a cost no installed copy pays.
    Returns a note for the report.
    """
    import compileall

    import libos
    import occlumfs

    packages = [Path(m.__file__).parent for m in (occlumfs, libos)]
    if not all(compileall.compile_dir(p, quiet=1) for p in packages):
        return "occlumfs NOT byte-compiled: each command compiled its modules"
    return "occlumfs and libos byte-compiled before timing, as installing them does"
