"""The image commands as a user runs them: output, exit codes, one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli

from merkle.trees import make_golden_tree, pattern, set_times
from occlumfs.errors import ExitCode
from occlumfs.keys import write_key_file
from occlumfs.merkle.format import BLOCK_SIZE, Descriptor, Layout

COMMANDS = ["mkimage", "digest", "verify", "ls", "cat", "stat"]


def _no_traceback(done) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert done.stderr.startswith("occlumfs: error: "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    src = make_golden_tree(base / "src")
    image = base / "image"
    done = run_cli("mkimage", src, image)
    digest = done.stdout.strip().splitlines()[-1]
    assert digest.startswith("sha256:") and len(digest) == 71
    key_file = base / "key"
    write_key_file(key_file, bytes(range(16)))
    encrypted = base / "encrypted"
    edigest = run_cli("mkimage", src, encrypted, "--key-file", key_file, "-j", "2").stdout
    return src, image, digest, encrypted, edigest.strip().splitlines()[-1], key_file


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    done = run_cli(command, "--help")
    assert "Usage: " in done.stdout
    summary = done.stdout.split("\n\n")[1].strip()
    assert len(summary) > 20, summary


def test_mkimage_prints_the_digest_last_and_is_reproducible(built, tmp_path):
    src, image, digest, *_ = built
    again = run_cli("mkimage", src, tmp_path / "again")
    assert again.stdout.strip().splitlines()[-1] == digest
    assert again.stderr == ""  # no progress bar without a terminal
    assert (tmp_path / "again").read_bytes() == image.read_bytes()
    assert run_cli("digest", image).stdout.strip() == digest


def test_mkimage_honours_source_date_epoch(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    set_times(src, 2_000_000_000 * 10**9)
    run_cli("mkimage", src, tmp_path / "img", env={"SOURCE_DATE_EPOCH": "1600000000"})
    out = run_cli("stat", tmp_path / "img", "f").stdout
    assert "mtime_ns: 1600000000000000000" in out
    bad = run_cli("mkimage", src, tmp_path / "x", env={"SOURCE_DATE_EPOCH": "soon"}, check=False)
    assert bad.returncode == ExitCode.USAGE and "SOURCE_DATE_EPOCH" in bad.stderr
    _no_traceback(bad)


def test_mkimage_from_tar_and_refusing_tar_slip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    with tarfile.open(tmp_path / "ok.tar.gz", "w:gz") as tf:
        tf.add(src, arcname=".")
    done = run_cli("mkimage", tmp_path / "ok.tar.gz", tmp_path / "ok.img")
    assert run_cli("cat", tmp_path / "ok.img", "f").stdout == "x"
    assert done.stdout.startswith("sha256:")
    with tarfile.open(tmp_path / "evil.tar", "w") as tf:
        info = tarfile.TarInfo("../../etc/evil")
        tf.addfile(info)
    bad = run_cli("mkimage", tmp_path / "evil.tar", tmp_path / "evil.img", check=False)
    assert bad.returncode == ExitCode.FORMAT and "'..'" in bad.stderr
    _no_traceback(bad)
    assert not (tmp_path / "evil.img").exists()
    missing = run_cli("mkimage", tmp_path / "nope", tmp_path / "x.img", check=False)
    assert missing.returncode == ExitCode.NOT_FOUND
    _no_traceback(missing)


def test_ls_cat_stat(built):
    src, image, digest, *_ = built
    names = run_cli("ls", image, "--digest", digest).stdout.splitlines()
    assert names == sorted(names) and "five" in names and "caf\ufffd" in names
    assert run_cli("ls", image, "dir").stdout.split() == ["file", "hard-b", "rel-link", "sub"]
    long = run_cli("ls", "-l", image, "dir").stdout
    assert "rel-link -> ../one" in long and long.startswith("-rw-r--r--")
    assert run_cli("ls", "-l", image, "chr").stdout.startswith("crw-------")
    assert run_cli("cat", image, "dir/file", "--digest", digest).stdout == "in a dir\n"
    out = run_cli("stat", image, "owned").stdout
    assert "mode: -rwsr-x--x (104751)" in out and "uid: 1234" in out and "gid: 5678" in out
    assert "xattr: user.binary=" in run_cli("stat", image, "one").stdout
    assert "rdev: 259,65537" in run_cli("stat", image, "blk").stdout
    assert "target: /etc/passwd" in run_cli("stat", image, "abs-link").stdout
    assert f"links: {(src / 'hard-a').stat().st_nlink}" in run_cli("stat", image, "hard-a").stdout


def test_cat_writes_exact_bytes(built, tmp_path):
    _, image, *_ = built
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "occlumfs", "cat", str(image), "blocks.bin"],
        capture_output=True,
        check=True,
    )
    assert done.stdout == pattern("blocks", 3 * BLOCK_SIZE + 7)


def test_path_errors(built):
    _, image, *_ = built
    for args, code, words in [
        (("cat", image, "missing"), ExitCode.NOT_FOUND, "no such file"),
        (("cat", image, "dir"), ExitCode.USAGE, "not a regular file"),
        (("stat", image, "one/below"), ExitCode.NOT_FOUND, "one/below: not a directory"),
        # A trailing slash asks for a directory, as in POSIX.
        (("ls", image, "one/"), ExitCode.NOT_FOUND, "one/: not a directory"),
        (("cat", image, "one/"), ExitCode.NOT_FOUND, "one/: not a directory"),
        (("ls", image, "nope"), ExitCode.NOT_FOUND, "no such file"),
        (("ls", image.with_name("absent")), ExitCode.NOT_FOUND, "does not exist"),
        (("digest", image.with_name("absent")), ExitCode.NOT_FOUND, "does not exist"),
        (("ls", image, "x" * 300), ExitCode.ERROR, "File name too long"),
        # A directory the host refuses to write in (a missing one is 14: tests/test_cli.py).
        (("mkimage", image.parent / "src", "/sys/image"), ExitCode.ERROR, "mkimage: "),
    ]:
        done = run_cli(*args, check=False)
        assert done.returncode == code, (args, done.stderr)
        assert words in done.stderr
        _no_traceback(done)


def test_verify_ok_and_tampered(built, tmp_path):
    _, image, digest, *_ = built
    ok = run_cli("verify", image, "--digest", digest)
    assert ok.stdout.strip().endswith("OK")
    raw = bytearray(image.read_bytes())
    layout = Layout.of(Descriptor.parse(bytes(raw[:156])))
    raw[layout.heap_start * BLOCK_SIZE + 10] ^= 1
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(raw))
    done = run_cli("verify", bad, "--digest", digest, check=False)
    assert done.returncode == ExitCode.INTEGRITY
    assert "metadata heap block" in done.stderr and "failed verification" in done.stderr
    _no_traceback(done)
    wrong = run_cli("verify", image, "--digest", "sha256:" + "0" * 64, check=False)
    assert wrong.returncode == ExitCode.INTEGRITY and "digest mismatch" in wrong.stderr
    _no_traceback(wrong)
    junk = run_cli("verify", image, "--digest", "nonsense", check=False)
    assert junk.returncode == ExitCode.FORMAT and "not an image digest" in junk.stderr
    ls = run_cli("ls", bad, "--digest", digest, check=False)
    assert ls.returncode == ExitCode.INTEGRITY
    _no_traceback(ls)


def test_encrypted_image_commands(built, tmp_path):
    _, _, _, encrypted, edigest, key_file = built
    args = ("--digest", edigest, "--key-file", key_file)
    assert "five" in run_cli("ls", encrypted, *args).stdout.split()
    assert run_cli("cat", encrypted, "dir/file", *args).stdout == "in a dir\n"
    assert run_cli("verify", encrypted, *args).stdout.strip().endswith("OK")
    other = tmp_path / "other.key"
    write_key_file(other, bytes(16))
    for command in ("ls", "verify", "stat"):
        extra = ("one",) if command == "stat" else ()
        wrong = run_cli(command, encrypted, *extra, "--key-file", other, check=False)
        assert wrong.returncode == ExitCode.WRONG_KEY and "wrong key" in wrong.stderr
        _no_traceback(wrong)
        missing = run_cli(command, encrypted, *extra, check=False)
        assert missing.returncode == ExitCode.WRONG_KEY and "--key-file" in missing.stderr
        _no_traceback(missing)
    (tmp_path / "bad.key").write_text("not a key\n")
    bad = run_cli("ls", encrypted, "--key-file", tmp_path / "bad.key", check=False)
    assert bad.returncode == ExitCode.FORMAT and "not an image key" in bad.stderr
    assert "not a key" not in bad.stderr  # key material is never echoed


def test_not_an_image(tmp_path):
    (tmp_path / "text").write_bytes(b"hello" * 2000)
    for command in ("digest", "verify", "ls"):
        done = run_cli(command, tmp_path / "text", check=False)
        assert done.returncode == ExitCode.FORMAT, command
        assert "not an occlumfs image" in done.stderr
        _no_traceback(done)
    assert os.path.exists(tmp_path / "text")


def test_dir_and_tar_build_agree_through_the_cli(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "b").write_bytes(pattern("b", 10000))
    set_times(src, 1_700_000_000 * 10**9)
    with tarfile.open(tmp_path / "t.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname=".")
    one = run_cli("mkimage", src, tmp_path / "1").stdout.strip()
    two = run_cli("mkimage", tmp_path / "t.tar", tmp_path / "2").stdout.strip()
    assert one == two
    assert Path(tmp_path / "1").read_bytes() == Path(tmp_path / "2").read_bytes()


def test_the_command_table_names_every_command_where_it_lives():
    import importlib

    from occlumfs.cli import COMMAND_MODULES, main

    for name, module in COMMAND_MODULES.items():
        commands = importlib.import_module(f"occlumfs.cli.{module}").COMMANDS
        assert name in {c.name for c in commands}, (name, module)
    assert set(main.commands) == set(COMMAND_MODULES)


def test_mkimage_loads_neither_fuse_nor_cryptography(tmp_path):
    # Start-up is a visible share of building a small tree (docs/performance.md).
    src = make_golden_tree(tmp_path / "src")
    script = (
        "import sys\n"
        "from occlumfs.cli import main\n"
        "try:\n"
        "    main(['mkimage', sys.argv[1], sys.argv[2]], prog_name='occlumfs')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('pyfuse3', 'cryptography', 'occlumfs.sefs', 'occlumfs.mount')"
        " if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(src), str(tmp_path / "img")],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("sha256:")
    assert lines[-1] == "[]"


@pytest.mark.parametrize(
    ("argv", "parsed"),
    [
        (["mkimage", "s", "i"], ("s", "i", None)),
        (["mkimage", "-j", "3", "s", "i"], ("s", "i", 3)),
        (["mkimage", "s", "-j2", "i"], ("s", "i", 2)),
        (["mkimage", "s", "i", "--jobs", "1"], ("s", "i", 1)),
        (["mkimage", "s", "i", "--jobs=4"], ("s", "i", 4)),
        # Everything else is click's to parse (and to refuse).
        (["mkimage", "s"], None),
        (["mkimage", "s", "i", "x"], None),
        (["mkimage", "s", "i", "-j", "0"], None),
        (["mkimage", "s", "i", "-j"], None),
        (["mkimage", "s", "i", "-j", "x"], None),
        (["mkimage", "s", "i", "-j", "1", "-j", "2"], None),
        (["mkimage", "s", "i", "--key-file", "k"], None),
        (["mkimage", "s", "i", "--help"], None),
        (["mkimage", "--", "s", "i"], None),
        (["mkimage", "", "i"], None),
        (["-v", "mkimage", "s", "i"], None),
        (["digest", "i"], None),
        ([], None),
    ],
)
def test_the_plain_mkimage_command_lines(argv, parsed):
    from occlumfs.cli.quick import plain_mkimage

    want = parsed and (Path(parsed[0]), Path(parsed[1]), parsed[2])
    assert plain_mkimage(argv) == want


def _python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"},
    )


def _plain_mkimage_loads(tmp_path, names: tuple[str, ...]) -> None:
    """A plain mkimage builds the right image and loads none of ``names`` itself.

    Modules the interpreter had already loaded before ours (a site hook may
    load pathlib) do not count.
    """
    src = make_golden_tree(tmp_path / "src")
    done = _python(
        "import sys\n"
        "before = set(sys.modules)\n"
        "from occlumfs.cli.quick import run_plain\n"
        "code = run_plain(sys.argv[2:])\n"
        "names = sys.argv[1].split(',')\n"
        "print(code, sorted(m for m in names if m in sys.modules and m not in before))\n",
        ",".join(names),
        "mkimage",
        src,
        tmp_path / "img",
    )
    digest, loaded = done.stdout.splitlines()
    assert loaded == "0 []", done.stderr
    assert digest == run_cli("digest", tmp_path / "img").stdout.strip()


def test_a_plain_mkimage_loads_no_click(tmp_path):
    _plain_mkimage_loads(tmp_path, ("click", "logging", "pyfuse3", "cryptography"))


def test_a_plain_mkimage_loads_no_pathlib_pickle_or_threading(tmp_path):
    # Each costs milliseconds of start-up (pathlib and pickle load re); the
    # plain build needs none of them.
    names = ("pathlib", "pickle", "re", "threading", "signal", "enum", "typing")
    _plain_mkimage_loads(tmp_path, names)


def test_a_plain_mkimage_fails_as_through_click(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    (tmp_path / "file").write_bytes(b"not a tar archive")
    through_click = (
        "import sys\nfrom occlumfs.cli import main\nmain(sys.argv[1:], prog_name='occlumfs')\n"
    )
    plain = "import runpy\nrunpy.run_module('occlumfs', run_name='__main__')\n"
    cases = [
        ["mkimage", tmp_path / "absent", tmp_path / "a.img"],
        ["mkimage", tmp_path / "file", tmp_path / "b.img"],
        ["mkimage", src, tmp_path / "no-dir" / "c.img"],
        ["mkimage", src, tmp_path],  # the image path is a directory
    ]
    for case in cases:
        one = _python(plain, *case)
        other = _python(through_click, *case)
        assert one.returncode != 0 and one.stdout == "", one
        assert "Traceback" not in one.stderr
        pid = re.compile(r"tmp-[0-9]+")  # the scratch file's name carries the process id
        assert (one.returncode, pid.sub("", one.stderr)) == (
            other.returncode,
            pid.sub("", other.stderr),
        ), case
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "src"]  # nothing written


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_mkimage_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, jobs):
    """The image file is allocated up front where the filesystem can (tmpfs can):
    a disk too small for the image fails there, before any data is copied, with
    one line, exit 1, and no scratch file left; the same as when a write fails."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):  # two batches (6 MB): a forked build with -j 2
        (src / f"f{i:02}").write_bytes(pattern(f"f{i}", 100_000))
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk], check=True)
    try:
        done = run_cli("mkimage", "-j", jobs, src, disk / "img", check=False)
        assert done.returncode == ExitCode.ERROR
        assert done.stderr == f"occlumfs: error: mkimage: {disk / 'img'}: No space left on device\n"
        assert done.stdout == ""
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", disk], check=False)
