"""occlum new / build / run: the seed flow, a busybox script, and the refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)
from libos_fixtures import assert_no_leftover_mounts

from libos.sandbox import _own_cgroup

pytestmark = pytest.mark.fuse  # occlum run serves the rootfs over FUSE


def test_seed_flow_prints_hello_world(tmp_path, hello_world, occlum):
    # occlum-gcc hello_world.c -o hello_world; occlum new; cp; occlum build; occlum run
    assert b"ld-musl" in hello_world.read_bytes()  # a musl program, as occlum-gcc makes
    occlum("new", "occlum_hello", cwd=tmp_path)
    inst = tmp_path / "occlum_hello"
    for d in ("bin", "lib", "lib64", "root", "host", "tmp", "dev", "proc", "etc", "sbin"):
        assert (inst / "image" / d).is_dir(), d
    for f in ("hosts", "resolv.conf", "localtime"):
        assert (inst / "image/etc" / f).is_file(), f
    assert (inst / "image/lib/ld-musl-x86_64.so.1").is_file()
    assert (inst / "build").is_dir() and (inst / "run").is_dir()
    (inst / "image/bin/hello_world").write_bytes(hello_world.read_bytes())
    (inst / "image/bin/hello_world").chmod(0o755)
    built = occlum("build", cwd=inst)
    assert "development key" in built.stderr
    done = occlum("run", "/bin/hello_world", cwd=inst)
    assert done.stdout == "Hello World!\n"
    assert "resource limits via" in done.stderr
    assert_no_leftover_mounts(inst)


def test_rebuild_without_changes_does_no_work(built, occlum):
    layer = built / "build/mount/__ROOT/image.layer"
    before = layer.stat().st_mtime_ns
    again = occlum("build", cwd=built)
    assert "nothing changed" in again.stdout
    assert layer.stat().st_mtime_ns == before
    (built / "image/bin/new_file").write_text("x")
    changed = occlum("build", cwd=built)
    assert "built image layer" in changed.stdout
    assert layer.stat().st_mtime_ns != before


def test_print_mrsigner_and_mrenclave(built, occlum):
    sig = json.loads((built / "build/manifest.sig").read_text())
    mrenclave = occlum("print", "mrenclave", cwd=built).stdout.strip()
    assert mrenclave == sig["mrenclave"] and len(mrenclave) == 64
    mrsigner = occlum("print", "mrsigner", cwd=built).stdout.strip()
    assert len(mrsigner) == 64 and mrsigner != mrenclave


BUSYBOX_SCRIPT = r"""
set -e
echo one two three | tr ' ' '\n' | sort -r | head -n 2
( cd /tmp && echo sub > f && cat f )
x=$( (echo inner; exit 3) || true ); echo "captured $x"
sleep 0.2 & bg=$!
echo "bg started"
wait $bg; echo "bg status $?"
sh -c 'exit 7' || echo "child exited $?"
echo $$ > /tmp/pid; cat /tmp/pid
hostname
cat /proc/self/status | grep -E '^(CapEff|NoNewPrivs)'
ls /host >/dev/null && echo host visible
[ -e /etc/passwd ] || [ -e /usr ] || [ -e /home ] || echo no-host-files
ls /host/.occlum | wc -l
"""


def test_busybox_script_with_pipes_subshells_and_jobs(built, occlum):
    (built / "script.sh").write_text(BUSYBOX_SCRIPT)
    done = occlum("run", "/bin/busybox", "sh", "/host/script.sh", cwd=built)
    lines = done.stdout.splitlines()
    assert lines[:2] == ["two", "three"]
    assert "sub" in lines
    assert "captured inner" in lines
    assert "bg started" in lines and "bg status 0" in lines
    assert "child exited 7" in lines
    assert "occlum" in lines  # the sandbox's own uts namespace
    assert "CapEff:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines
    assert "host visible" in lines
    assert "no-host-files" in lines  # nothing of the host outside /host
    assert lines[-1].strip() == "0"  # the instance's secrets are hidden under /host
    # Our own pid namespace: the shell is a low pid, not the host's.
    pid_line = lines[lines.index("child exited 7") + 1]
    assert int(pid_line) < 10


def test_exit_status_and_signal_status_propagate(built, occlum):
    assert (
        occlum("run", "/bin/busybox", "sh", "-c", "exit 42", cwd=built, check=False).returncode
        == 42
    )
    killed = occlum("run", "/bin/busybox", "sh", "-c", "kill -9 $$", cwd=built, check=False)
    assert killed.returncode == 128 + 9


def test_env_default_and_untrusted(built, occlum):
    config = json.loads((built / "Occlum.json").read_text())
    config["env"] = {"default": ["OCCLUM=yes", "FOO=trusted"], "untrusted": ["FOO", "BAR"]}
    (built / "Occlum.json").write_text(json.dumps(config))
    occlum("build", cwd=built)
    done = occlum("run", "/bin/busybox", "env", cwd=built, env={"BAR": "from-host", "SECRET": "no"})
    env = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert env["OCCLUM"] == "yes" and env["FOO"] == "trusted" and env["BAR"] == "from-host"
    assert "SECRET" not in env and "PATH" not in env
    over = occlum("run", "/bin/busybox", "env", cwd=built, env={"FOO": "host-wins"})
    assert "FOO=host-wins" in over.stdout.splitlines()


def test_entry_points_are_enforced(built, occlum):
    for bad in ("bin/hello_world", "/bin/../bin/hello_world", "/binx/hello_world", "/etc/hosts"):
        done = occlum("run", bad, cwd=built, check=False)
        assert done.returncode == 2, (bad, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    missing = occlum("run", "/bin/nope", cwd=built, check=False)
    assert missing.returncode == 14 and "no such program" in missing.stderr


def test_plain_run_and_click_run_report_alike(built, occlum, tmp_path):
    # `occlum run /PROGRAM ...` skips click (libos/entry.py); `occlum run -- /PROGRAM`
    # goes through it: the same status, output, error lines and exit codes.
    script = ["/bin/busybox", "sh", "-c", "echo $0; exit 3", "a"]
    seen = []
    for args in (["/bin/hello_world"], ["/bin/nope"], script):
        plain = occlum("run", *args, cwd=built, check=False)
        clicked = occlum("run", "--", *args, cwd=built, check=False)
        assert (plain.returncode, plain.stdout) == (clicked.returncode, clicked.stdout), args
        assert plain.stderr == clicked.stderr, args
        seen.append((plain.returncode, plain.stdout))
    assert seen == [(0, "Hello World!\n"), (14, ""), (3, "a\n")]
    outside = occlum("run", "/bin/hello_world", cwd=tmp_path, check=False)
    assert outside.returncode == 14
    expected = f"{tmp_path}: not an Occlum instance (no Occlum.json); run 'occlum init'"
    assert outside.stderr == f"occlum: error: {expected}\n"


def test_a_refused_run_leaves_no_cgroup_and_no_process(built):
    # occlum run forks bubblewrap's process into the cgroups before the mount; a
    # program found missing after the mount ends it, then removes the cgroups.
    cmd = [sys.executable, "-m", "libos", "run", "/bin/nope"]
    proc = subprocess.Popen(cmd, cwd=built, stderr=subprocess.PIPE, text=True)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 14, err
    assert err.splitlines()[-1] == "occlum: error: /bin/nope: no such program in the instance"
    mine = [_own_cgroup(c) for c in ("", "memory", "pids")]
    left = [p / f"occlum-{proc.pid}" for p in mine if p is not None]
    assert not [p for p in left if p.exists()], left
    assert "resource limits via" not in err  # said only when the program runs


def test_run_reads_the_build_not_the_config(built, occlum):
    config = json.loads((built / "Occlum.json").read_text())
    config["entry_points"] = ["/sbin"]
    (built / "Occlum.json").write_text(json.dumps(config))
    assert occlum("run", "/bin/hello_world", cwd=built).stdout == "Hello World!\n"


def _one_line(done, code: int, words: str) -> None:
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in done.stderr, lines


def test_a_malformed_busy_poll_setting_is_a_usage_error_before_anything_runs(built, occlum):
    env = {"OCCLUMFS_BUSY_POLL_US": "fast"}
    done = occlum("run", "/bin/hello_world", cwd=built, env=env, check=False)
    _one_line(done, 2, "OCCLUMFS_BUSY_POLL_US")
    assert done.stdout == ""
    assert_no_leftover_mounts(built)


def test_refuses_when_not_built(tmp_path, occlum):
    occlum("new", "i", cwd=tmp_path)
    _one_line(occlum("run", "/bin/x", cwd=tmp_path / "i", check=False), 14, "not built")


def test_refuses_a_tampered_manifest(built, occlum):
    manifest = built / "build/manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"/bin"', b'"/etc"'))
    _one_line(occlum("run", "/bin/hello_world", cwd=built, check=False), 13, "measurement")


def test_refuses_a_tampered_signature(built, occlum):
    sig_path = built / "build/manifest.sig"
    sig = json.loads(sig_path.read_text())
    raw = bytearray(__import__("base64").b64decode(sig["signature"]))
    raw[5] ^= 1
    sig["signature"] = __import__("base64").b64encode(bytes(raw)).decode()
    sig_path.write_text(json.dumps(sig))
    _one_line(occlum("run", "/bin/hello_world", cwd=built, check=False), 13, "bad signature")


def test_refuses_a_resigned_manifest_with_a_changed_measurement(built, occlum):
    # Changing the manifest and its claimed measurement still fails the signature.
    manifest = built / "build/manifest.json"
    data = manifest.read_bytes().replace(b'"/bin"', b'"/etc"')
    manifest.write_bytes(data)
    sig_path = built / "build/manifest.sig"
    sig = json.loads(sig_path.read_text())
    sig["mrenclave"] = __import__("hashlib").sha256(data).hexdigest()
    sig_path.write_text(json.dumps(sig))
    _one_line(occlum("run", "/bin/hello_world", cwd=built, check=False), 13, "bad signature")


def test_refuses_a_swapped_layer(built, occlum, tmp_path):
    (built / "image/bin/extra").write_text("changed")
    layer = built / "build/mount/__ROOT/image.layer"
    saved = layer.read_bytes()
    manifest = (built / "build/manifest.json").read_bytes()
    sig = (built / "build/manifest.sig").read_bytes()
    occlum("build", cwd=built)  # a different, valid layer...
    (built / "build/manifest.json").write_bytes(manifest)  # ...under the old manifest
    (built / "build/manifest.sig").write_bytes(sig)
    assert layer.read_bytes() != saved
    _one_line(occlum("run", "/bin/hello_world", cwd=built, check=False), 13, "digest mismatch")


def test_a_tampered_program_byte_never_runs(built, occlum, hello_world):
    layer = built / "build/mount/__ROOT/image.layer"
    data = bytearray(layer.read_bytes())
    code = hello_world.read_bytes()
    # Flip a byte in the program's data blocks (found by its content).
    at = bytes(data).find(code[4096 : 4096 + 64])
    assert at > 0
    data[at + 10] ^= 0xFF
    layer.write_bytes(bytes(data))
    done = occlum("run", "/bin/hello_world", cwd=built, check=False)
    assert done.returncode != 0
    assert "Hello World!" not in done.stdout


def test_malformed_config_names_key_and_line(built, occlum):
    text = (built / "Occlum.json").read_text()
    (built / "Occlum.json").write_text(text.replace('"max_num_of_threads"', '"max_threads"'))
    line = next(
        i
        for i, s in enumerate((built / "Occlum.json").read_text().splitlines(), 1)
        if "max_threads" in s
    )
    done = occlum("build", cwd=built, check=False)
    _one_line(done, 15, f"Occlum.json:{line}: resource_limits.max_threads: unknown key")
    (built / "Occlum.json").write_text(text.replace('"OCCLUM=yes"', '"OCCLUM=yes",,'))
    done = occlum("build", cwd=built, check=False)
    assert done.returncode == 15 and "Occlum.json:" in done.stderr


def test_a_second_run_refuses_while_one_runs_and_status_shows_it(built, occlum):
    import subprocess
    import sys

    assert occlum("status", cwd=built).stdout == "built\n"
    first = subprocess.Popen(
        [sys.executable, "-m", "libos", "run", "/bin/busybox", "sh", "-c", "echo up; read x"],
        cwd=built,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert first.stdout.readline() == b"up\n"  # the first run holds the instance now
        second = occlum("run", "/bin/hello_world", cwd=built, check=False)
        _one_line(second, 16, "in use")
        shown = occlum("status", cwd=built).stdout.splitlines()
        assert shown[0] == "built" and shown[1] == f"running (pid {first.pid})"
    finally:
        first.stdin.write(b"\n")
        first.stdin.close()
        assert first.wait(timeout=60) == 0
        first.stdout.close()
        first.stderr.close()
    assert occlum("status", cwd=built).stdout == "built\n"


def test_sign_with_rsa_3072_and_ed25519_keys(built, occlum, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    signers = set()
    for name, key in (
        ("rsa", rsa.generate_private_key(public_exponent=65537, key_size=3072)),
        ("ed", ed25519.Ed25519PrivateKey.generate()),
    ):
        pem = tmp_path / f"{name}.pem"
        pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        done = occlum("build", "--sign-key", pem, cwd=built)
        assert "development key" not in done.stderr
        signers.add(occlum("print", "mrsigner", cwd=built).stdout.strip())
        if name == "ed":
            # MRSIGNER policy: the writable layer's autokey belongs to the first
            # signer; another signer's build does not open it.
            wrong = occlum("run", "/bin/hello_world", cwd=built, check=False)
            _one_line(wrong, 12, "wrong key")
            shutil.rmtree(built / "run/mount/__ROOT")
        assert occlum("run", "/bin/hello_world", cwd=built).stdout == "Hello World!\n"
    assert len(signers) == 2
    weak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "weak.pem").write_bytes(
        weak.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    _one_line(
        occlum("build", "--sign-key", tmp_path / "weak.pem", cwd=built, check=False), 15, "3072"
    )


def test_image_key_encrypts_the_layer(built, occlum, tmp_path):
    key = tmp_path / "image.key"
    key.write_text("-".join(["a5"] * 16) + "\n")
    occlum("build", "--image-key", key, cwd=built)
    layer = (built / "build/mount/__ROOT/image.layer").read_bytes()
    assert b"Hello World!" not in layer
    assert occlum("run", "/bin/hello_world", cwd=built).stdout == "Hello World!\n"
    other = tmp_path / "other.key"
    other.write_text("-".join(["5a"] * 16) + "\n")
    _one_line(
        occlum("run", "--image-key", other, "/bin/hello_world", cwd=built, check=False), 12, "key"
    )


def test_occlum_gxx_programs_run_inside(built, occlum, tmp_path):
    src = tmp_path / "hi.cc"
    src.write_text('#include <iostream>\nint main() { std::cout << "hi C++" << std::endl; }\n')
    occlum("g++", src, "-o", built / "image/bin/hi", module="libos.toolchain")
    occlum("build", cwd=built)
    assert occlum("run", "/bin/hi", cwd=built).stdout == "hi C++\n"


def test_new_refuses_an_existing_directory(tmp_path, occlum):
    (tmp_path / "x").mkdir()
    _one_line(occlum("new", "x", cwd=tmp_path, check=False), 2, "already exists")
    occlum("init", cwd=tmp_path / "x")
    _one_line(occlum("init", cwd=tmp_path / "x", check=False), 2, "already an Occlum instance")
    assert Path(tmp_path / "x/Occlum.json").is_file()


def test_sigterm_to_occlum_run_reaches_the_program(built):
    import signal
    import subprocess
    import sys

    script = 'trap "echo got-term; exit 3" TERM; echo up; while :; do busybox sleep 1; done'
    proc = subprocess.Popen(
        [sys.executable, "-m", "libos", "run", "/bin/busybox", "sh", "-c", script],
        cwd=built,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline() == b"up\n"
        proc.send_signal(signal.SIGTERM)
        out, _err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out == b"got-term\n"
    assert proc.returncode == 3


def _set_limits(inst: Path, **limits) -> None:
    config = json.loads((inst / "Occlum.json").read_text())
    config["resource_limits"].update(limits)
    (inst / "Occlum.json").write_text(json.dumps(config, indent=4))


def test_resource_limits_are_enforced(built, occlum):
    _set_limits(built, user_space_size="24MB", max_num_of_threads=8)
    occlum("build", cwd=built)
    big = occlum(
        "run",
        "/bin/busybox",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=64M",
        "count=1",
        cwd=built,
        check=False,
    )
    assert "resource limits via" in big.stderr and "memory 24MB, 8 tasks" in big.stderr
    assert big.returncode != 0  # 64 MiB in one buffer does not fit in 24 MiB
    small = occlum(
        "run",
        "/bin/busybox",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=1M",
        "count=4",
        cwd=built,
        check=False,
    )
    assert small.returncode == 0, small.stderr
    forks = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do busybox sleep 5 & done; wait; echo done"
    many = occlum("run", "/bin/busybox", "sh", "-c", forks, cwd=built, check=False)
    if "cgroup" in many.stderr:
        assert "can't fork" in many.stderr or "Resource temporarily" in many.stderr, many.stderr


def test_zero_limits_mean_no_limit_and_say_so(built, occlum):
    _set_limits(built, user_space_size="0MB", max_num_of_threads=0)
    occlum("build", cwd=built)
    big = occlum(
        "run", "/bin/busybox", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1",
        cwd=built,
    )  # fmt: skip
    assert "resource limits via none (no memory limit, no task limit)" in big.stderr
    env = {"OCCLUM_LIMITS": "rlimits"}  # not even as rlimits
    limits = occlum("run", "/bin/busybox", "sh", "-c", "ulimit -v", cwd=built, env=env)
    assert limits.stdout.split() == ["unlimited"]


def test_without_cgroups_the_limits_become_rlimits(built, occlum):
    _set_limits(built, user_space_size="24MB", max_num_of_threads=8)
    occlum("build", cwd=built)
    env = {"OCCLUM_LIMITS": "rlimits"}
    big = occlum(
        "run", "/bin/busybox", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1",
        cwd=built, check=False, env=env,
    )  # fmt: skip
    assert "resource limits via rlimits (memory 24MB, 8 tasks)" in big.stderr
    assert big.returncode != 0 and "memory" in big.stderr.lower()
    limits = occlum("run", "/bin/busybox", "sh", "-c", "ulimit -v; ulimit -s", cwd=built, env=env)
    assert limits.stdout.split() == [str(24 * 1024), str(4 * 1024)]  # KiB: AS, stack
