"""copy_bom: Occlum's BOM entries, checked hashes, one-line errors."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "app/data/.git").mkdir(parents=True)
    (src / "app/data/keep.txt").write_text("keep")
    (src / "app/data/.git/config").write_text("excluded")
    (src / "app/cfg.ini").write_text("[x]")
    os.symlink("cfg.ini", src / "app/cfg-link")
    (src / "file.txt").write_text("payload")
    return src


def _bom(tmp_path, text: str):
    (tmp_path / "bom.yaml").write_text(text)
    return tmp_path / "bom.yaml"


def test_mkdirs_links_dirs_files_rename_and_excludes(tmp_path, tree, occlum):
    digest = hashlib.sha256(b"payload").hexdigest().upper()
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc/base.yaml").write_text("targets:\n  - target: /\n    mkdirs: [opt/x]\n")
    bom = _bom(
        tmp_path,
        f"""\
includes:
  - base.yaml
excludes:
  - .git
targets:
  - target: /
    mkdirs:
      - bin
      - var/lib
    createlinks:
      - src: ../file.txt
        linkname: bin/file-link
    copy:
      - from: src
        dirs:
          - app
        files:
          - name: file.txt
            hash: {digest}
            rename: renamed.txt
  - target: /flat
    copy:
      - dirs:
          - src/app/
""",
    )
    root = tmp_path / "image"
    occlum("-f", bom, "--root", root, "--include-dir", tmp_path / "inc", module="libos.bom")
    assert (root / "opt/x").is_dir() and (root / "var/lib").is_dir()
    assert os.readlink(root / "bin/file-link") == "../file.txt"
    assert (root / "renamed.txt").read_text() == "payload"
    assert (root / "app/data/keep.txt").read_text() == "keep"
    assert not (root / "app/data/.git").exists()
    assert os.readlink(root / "app/cfg-link") == "cfg.ini"
    assert (root / "flat/cfg.ini").is_file() and not (root / "flat/app").exists()
    mtime = (root / "renamed.txt").stat().st_mtime_ns
    assert mtime == (tree / "file.txt").stat().st_mtime_ns
    # Again: nothing changed, nothing copied (the file is the same inode).
    ino = (root / "renamed.txt").stat().st_ino
    occlum("copy-bom", "-f", bom, "--root", root, "-i", tmp_path / "inc")
    assert (root / "renamed.txt").stat().st_ino == ino


def _fails(done, code: int, words: str) -> None:
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines


def test_a_wrong_hash_refuses(tmp_path, tree, occlum):
    bom = _bom(
        tmp_path,
        "targets:\n  - target: /\n    copy:\n      - from: src\n        files:\n"
        f"          - name: file.txt\n            hash: {'f' * 64}\n",
    )
    done = occlum("-f", bom, "--root", tmp_path / "image", module="libos.bom", check=False)
    _fails(done, 13, "sha256 mismatch")
    assert not (tmp_path / "image/file.txt").exists()


_HASHED = (
    "targets:\n  - target: /\n    copy:\n      - from: src\n        files:\n"
    "          - name: file.txt\n            hash: {}\n"
)


@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        ("targets:\n  - target: /\n    copyy: []\n", 15, "targets[0].copyy: unknown key"),
        ("targets:\n  - target: /\n   bad: [\n", 15, "bom.yaml:"),
        ("includes: [missing.yaml]\n", 14, "missing.yaml"),
        ("targets:\n  - target: /\n    copy:\n      - files: [/nonexistent]\n", 14, "nonexistent"),
        ("targets:\n  - target: /\n    mkdirs: [../../escape]\n", 15, "'..'"),
        (_HASHED.format("00"), 15, "files[0].hash: expected a sha256 of 64 hex digits, got '0'"),
        (_HASHED.format("g" * 64), 15, "files[0].hash: expected a sha256 of 64 hex digits"),
    ],
)
def test_bad_boms_are_one_line(tmp_path, tree, occlum, text, code, words):
    done = occlum(
        "-f", _bom(tmp_path, text), "--root", tmp_path / "image", module="libos.bom", check=False
    )
    _fails(done, code, words)


def test_autodep_of_a_musl_program(tmp_path, hello_world, occlum):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/hello").write_bytes(hello_world.read_bytes())
    bom = _bom(tmp_path, "targets:\n  - target: /bin\n    copy:\n      - files: [bin/hello]\n")
    occlum("-f", bom, "--root", tmp_path / "image", module="libos.bom")
    assert (tmp_path / "image/lib/ld-musl-x86_64.so.1").is_file()


def test_a_static_program_has_no_dependencies(tmp_path, occlum):
    """busybox-static names no interpreter and no dynamic section: the host's glibc
    loader, asked to list it, crashes; a static program needs nothing copied."""
    (tmp_path / "tools").mkdir()
    shutil.copy("/bin/busybox", tmp_path / "tools/busybox")
    bom = _bom(
        tmp_path,
        "targets:\n  - target: /bin\n    copy:\n      - files: [/bin/busybox]\n"
        "  - target: /opt\n    copy:\n      - dirs: [tools]\n",
    )
    done = occlum("-f", bom, "--root", tmp_path / "image", module="libos.bom", check=False)
    assert done.returncode == 0 and "warning" not in done.stderr.lower(), done.stderr
    image = tmp_path / "image"
    assert sorted(str(p.relative_to(image)) for p in image.rglob("*") if p.is_file()) == [
        "bin/busybox",
        "opt/tools/busybox",
    ]
