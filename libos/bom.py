"""``copy_bom``: copy what an Occlum BOM file lists into an image directory.

The BOM is Occlum's YAML: ``includes`` (other BOM files, found beside this one
or in ``--include-dir``), ``excludes`` (name patterns skipped inside copied
directories), and ``targets``, each with ``mkdirs``, ``createlinks``
(``src``, ``linkname``) and ``copy`` entries (``from``, ``dirs``, ``files``;
a file may be ``{name, hash, autodep, rename}``). Relative sources are
relative to the BOM file's directory. Files keep their mode and mtime, and
an unchanged destination (same size and mtime) is not copied again.

``autodep`` (default on) copies the shared libraries each ELF file needs, as
its own interpreter lists them (:mod:`libos.elfdeps`), to the same path under
the root. For files inside copied directories too (Python's ``lib-dynload``),
where a missing library is a warning rather than an error.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from libos import elfdeps
from occlumfs.errors import FormatError, IntegrityError, NotFoundError, OcclumfsError, UsageError
from occlumfs.hostio import read_named_file

log = logging.getLogger("libos.bom")

BOM_KEYS = {"includes", "excludes", "targets"}
TARGET_KEYS = {"target", "mkdirs", "createlinks", "copy"}
COPY_KEYS = {"from", "dirs", "files"}
FILE_KEYS = {"name", "hash", "autodep", "rename"}
LINK_KEYS = {"src", "linkname"}


@dataclass
class _Plan:
    excludes: list[str] = field(default_factory=list)
    targets: list[tuple[Path, dict]] = field(default_factory=list)  # (BOM dir, target)


def _load_yaml(path: Path) -> dict:
    import yaml

    text = read_named_file(path, "BOM file").decode(errors="replace")
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise FormatError(f"{path}{line}: not YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise FormatError(f"{path}: not YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FormatError(f"{path}: a BOM is a mapping with includes, excludes and targets")
    _check_keys(data, BOM_KEYS, path, "")
    return data


def _check_keys(node: dict, allowed: set[str], path: Path, where: str) -> None:
    for key in node:
        if key not in allowed:
            raise FormatError(f"{path}: {where}{key}: unknown key")


def _list(node: dict, key: str, path: Path, where: str) -> list:
    value = node.get(key) or []
    if not isinstance(value, list):
        raise FormatError(f"{path}: {where}{key}: expected a list")
    return value


def _find_include(name: str, base: Path, include_dirs: list[Path]) -> Path:
    for d in (base, *include_dirs):
        candidate = (d / name).resolve()
        if candidate.is_file():
            return candidate
    raise NotFoundError(f"{base}: included BOM {name!r} not found (use --include-dir)")


def _collect(path: Path, include_dirs: list[Path], plan: _Plan, seen: tuple[Path, ...]) -> None:
    path = path.resolve()
    if path in seen:
        raise FormatError(f"{path}: includes itself (through {' -> '.join(map(str, seen))})")
    data = _load_yaml(path)
    base = path.parent
    for name in _list(data, "includes", path, ""):
        _collect(_find_include(str(name), base, include_dirs), include_dirs, plan, (*seen, path))
    plan.excludes += [str(x) for x in _list(data, "excludes", path, "")]
    for i, target in enumerate(_list(data, "targets", path, "")):
        where = f"targets[{i}]."
        if not isinstance(target, dict) or not isinstance(target.get("target"), str):
            raise FormatError(f"{path}: {where}target: expected an absolute path")
        _check_keys(target, TARGET_KEYS, path, where)
        plan.targets.append((base, {**target, "_where": f"{path}: {where}"}))


class _Copier:
    def __init__(self, root: Path, excludes: list[str], dry_run: bool) -> None:
        self.root = root.resolve()
        self.excludes = excludes
        self.dry_run = dry_run
        self.loaders: set[str] = set()
        self.deps: set[str] = set()
        self.soft_deps: list[Path] = []  # ELF files in copied dirs: autodep, warnings only

    def dest(self, inside: str, where: str) -> Path:
        """``inside`` (an image path) under the root, refusing any way out of it."""
        parts = [p for p in inside.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise FormatError(f"{where}: {inside!r}: '..' is not allowed in an image path")
        path = self.root.joinpath(*parts)
        parent = path.parent.resolve() if path.parent.exists() else None
        if parent is not None and parent != self.root and self.root not in parent.parents:
            raise UsageError(f"{where}: {inside!r}: a symlink in the root leads outside it")
        return path

    def mkdir(self, path: Path) -> None:
        log.info("mkdir -p %s", path)
        if not self.dry_run:
            path.mkdir(parents=True, exist_ok=True)

    def copy_file(self, src: Path, dst: Path) -> None:
        st = os.stat(src)
        try:
            old = os.lstat(dst)
            if (
                stat.S_ISREG(old.st_mode)
                and old.st_size == st.st_size
                and old.st_mtime_ns == st.st_mtime_ns
            ):
                return
        except FileNotFoundError:
            pass
        log.info("copy %s -> %s", src, dst)
        if self.dry_run:
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        shutil.copy2(src, dst)  # content of a symlinked source, with its mode and mtime

    def copy_tree(self, src: Path, dst: Path) -> None:
        self.mkdir(dst)
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            if any(fnmatch.fnmatch(entry.name, pat) for pat in self.excludes):
                continue
            s, d = Path(entry.path), dst / entry.name
            if entry.is_symlink():
                log.info("link %s -> %s", d, os.readlink(s))
                if not self.dry_run:
                    if d.is_symlink() or d.exists():
                        d.unlink()
                    os.symlink(os.readlink(s), d)
            elif entry.is_dir():
                self.copy_tree(s, d)
            elif entry.is_file():
                self.copy_file(s, d)
                if elfdeps.is_elf(s):
                    self.soft_deps.append(s)

    def autodep(self, src: Path, strict: bool) -> None:
        if elfdeps.is_static(src):
            return
        loader = elfdeps.interpreter(src)
        if loader is not None:
            self.loaders.add(loader)
        loaders = [loader] if loader else sorted(self.loaders) or [elfdeps.HOST_GLIBC_LOADER]
        found, missing = elfdeps.list_deps(src, loaders[0])
        if missing:
            what = f"{src}: shared libraries not found: {', '.join(missing)}"
            if strict:
                raise NotFoundError(what)
            log.warning("%s", what)
        if loader:
            found.append(loader)
        self.deps.update(found)

    def copy_deps(self) -> None:
        for soft in self.soft_deps:
            self.autodep(soft, strict=False)
        for dep in sorted(self.deps):
            self.copy_file(Path(dep), self.dest(dep, "autodep"))


def _file_entry(item, where: str) -> dict:
    if isinstance(item, str):
        return {"name": item}
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        for key in item:
            if key not in FILE_KEYS:
                raise FormatError(f"{where}{key}: unknown key")
        want = item.get("hash")
        if isinstance(want, int) and not isinstance(want, bool):
            want = str(want)  # YAML reads a hash of decimal digits alone as a number
        if want is not None:
            if not (isinstance(want, str) and re.fullmatch(r"[0-9a-fA-F]{64}", want.strip())):
                raise FormatError(f"{where}hash: expected a sha256 of 64 hex digits, got {want!r}")
            item = {**item, "hash": want}
        return item
    raise FormatError(f"{where}: expected a file name or {{name, hash, autodep, rename}}")


def _check_hash(src: Path, want: str, where: str) -> None:
    h = hashlib.sha256()
    with open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != want.strip().lower():
        raise IntegrityError(f"{where}: {src}: sha256 mismatch (the BOM pins another file)")


def _run_target(copier: _Copier, base: Path, target: dict) -> None:
    where = target["_where"]
    tdir = target["target"]
    if not tdir.startswith("/"):
        raise FormatError(f"{where}target: {tdir!r} is not an absolute path")
    for d in target.get("mkdirs") or []:
        copier.mkdir(copier.dest(f"{tdir}/{d}", where + "mkdirs"))
    for link in target.get("createlinks") or []:
        if not isinstance(link, dict) or set(link) != LINK_KEYS:
            raise FormatError(f"{where}createlinks: expected {{src, linkname}}")
        at = copier.dest(f"{tdir}/{link['linkname']}", where + "createlinks")
        log.info("ln -s %s %s", link["src"], at)
        if not copier.dry_run:
            at.parent.mkdir(parents=True, exist_ok=True)
            if at.is_symlink() or at.exists():
                at.unlink()
            os.symlink(str(link["src"]), at)
    for j, copy in enumerate(target.get("copy") or []):
        cw = f"{where}copy[{j}]."
        if not isinstance(copy, dict):
            raise FormatError(f"{cw}: expected a mapping with from, dirs, files")
        for key in copy:
            if key not in COPY_KEYS:
                raise FormatError(f"{cw}{key}: unknown key")
        prefix = base / str(copy["from"]) if copy.get("from") else None
        dirs, files = copy.get("dirs") or [], copy.get("files") or []
        if not dirs and not files:
            if prefix is None or not prefix.is_dir():
                raise NotFoundError(f"{cw}from: {prefix} is not a directory")
            copier.copy_tree(prefix, copier.dest(tdir, cw))
        for d in dirs:
            src = (prefix / str(d)) if prefix else (base / str(d))
            if not src.is_dir():
                raise NotFoundError(f"{cw}dirs: {src} is not a directory")
            inside = tdir if str(d).endswith("/") else f"{tdir}/{src.name}"
            copier.copy_tree(src, copier.dest(inside, cw + "dirs"))
        for k, item in enumerate(files):
            entry = _file_entry(item, f"{cw}files[{k}].")
            src = (prefix / entry["name"]) if prefix else (base / entry["name"])
            if not src.is_file():
                raise NotFoundError(f"{cw}files[{k}]: {src} is not a file")
            if entry.get("hash") is not None:
                _check_hash(src, entry["hash"], f"{cw}files[{k}]")
            name = str(entry.get("rename") or src.name)
            copier.copy_file(src, copier.dest(f"{tdir}/{name}", cw + "files"))
            if entry.get("autodep", True) and elfdeps.is_elf(src):
                copier.autodep(src, strict=True)


def copy_bom(
    bom: Path, root: Path, include_dirs: list[Path] | None = None, *, dry_run: bool = False
) -> None:
    """Copy everything ``bom`` lists into ``root``; one-line errors, nothing half-checked."""
    plan = _Plan()
    _collect(Path(bom), [Path(d).resolve() for d in include_dirs or []], plan, ())
    if not dry_run:
        Path(root).mkdir(parents=True, exist_ok=True)
    copier = _Copier(Path(root), plan.excludes, dry_run)
    try:
        for base, target in plan.targets:
            _run_target(copier, base, target)
        copier.copy_deps()
    except OcclumfsError:
        raise
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise OcclumfsError(f"{where}{exc.strerror or exc}") from None


def main() -> None:
    """``copy_bom -f BOM --root DIR [--include-dir DIR]...`` (Occlum's tool name and flags)."""
    import click

    from libos.cli import copy_bom_command

    try:
        copy_bom_command.main(prog_name="copy_bom", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OcclumfsError as exc:
        print(f"copy_bom: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        print(f"copy_bom: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
