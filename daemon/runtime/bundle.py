"""Task bundles: ``<state>/<ns>/<id>`` holds config.json, rootfs and the shim's files.

The layout is containerd's (runtime/v2/bundle.go) because shims, ours and
containerd's, find their files there: ``config.json`` for runc, ``rootfs`` for the
mounts, ``address`` and ``shim.pid`` written by the shim, ``work`` linking to a
persistent working folder under the plugin root.
"""
from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from ctrd import identifiers
from ctrd.errors import AlreadyExists, InvalidArgument

from .mount import unmount_all

CONFIG = "config.json"


@dataclass(frozen=True)
class Bundle:
    id: str
    namespace: str
    path: Path

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def file(self, name: str) -> Path:
        return self.path / name

    def read(self, name: str) -> str | None:
        try:
            return self.file(name).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def delete(self) -> None:
        """Unmount the rootfs and remove the bundle and its work folder."""
        remove_trees(self.detach())

    def detach(self) -> list[Path]:
        """Unmount the rootfs and move the bundle and its work folder out of the way,
        under hidden names that nothing takes for a live bundle; returns those, for
        :func:`remove_trees` (the slow part, which need not hold up a caller: the
        task's id is free again as soon as this returns)."""
        work = None
        try:
            work = os.readlink(self.path / "work")
        except OSError:
            pass
        unmount_all(str(self.rootfs))
        try:
            self.rootfs.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            # Not empty: something was written into the bare folder; the rename below takes it.
            pass
        hidden = [_hide(self.path)]
        if work:
            hidden.append(_hide(Path(work)))
        return [h for h in hidden if h is not None]


def _hide(path: Path) -> Path | None:
    # Unique: the tree of an earlier task of the same id may still be on its way out.
    hidden = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return None
    return hidden


def remove_trees(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def create(state: Path, root: Path, namespace: str, id_: str, spec: bytes) -> Bundle:
    try:
        identifiers.validate(id_)
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid task id {id_}: {exc}") from None
    bundle = Bundle(id_, namespace, state / namespace / id_)
    work = root / namespace / id_
    bundle.path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        bundle.path.mkdir(mode=0o700)
    except FileExistsError:
        raise AlreadyExists(f"bundle {bundle.path}: already exists") from None
    try:
        bundle.rootfs.mkdir(mode=0o711)
        work.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(mode=0o711)
        os.symlink(work, bundle.path / "work")
        fd = os.open(bundle.path / CONFIG, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(spec)
    except BaseException:
        bundle.delete()
        raise
    return bundle


def load_all(state: Path) -> list[Bundle]:
    """Every bundle on disk; hidden folders (deleted, or half deleted by a daemon that
    stopped meanwhile) are removed."""
    found = []
    if not state.is_dir():
        return found
    for ns_dir in sorted(state.iterdir()):
        if not ns_dir.is_dir() or ns_dir.name.startswith("."):
            continue
        for b in sorted(ns_dir.iterdir()):
            if not b.is_dir():
                continue
            if b.name.startswith("."):
                shutil.rmtree(b, ignore_errors=True)
            else:
                found.append(Bundle(b.name, ns_dir.name, b))
    return found


def remove_orphan_work_dirs(root: Path, live: set[tuple[str, str]]) -> None:
    """Work folders whose bundle is gone (e.g. /run was wiped by a reboot)."""
    if not root.is_dir():
        return
    for ns_dir in root.iterdir():
        if not ns_dir.is_dir():
            continue
        for w in ns_dir.iterdir():
            if (ns_dir.name, w.name) not in live:
                shutil.rmtree(w, ignore_errors=True)
