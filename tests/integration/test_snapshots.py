"""Snapshotters, diff and unpack through the real `ctr`, compared with containerd 1.6."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from isal import igzip

from ctrd.oci import digest as digests
from ctrd.oci import mediatypes
from ctrd.oci import writer as w
from helpers.containerd_ref import containerd_ref, requires_containerd  # noqa: F401

pytestmark = pytest.mark.integration


def _base_image() -> w.Image:
    l1 = w.layer([w.directory("etc"), w.file("etc/hello", "hi\n"), w.directory("bin"),
                  w.file("bin/sh", b"#!sh", mode=0o755), w.symlink("bin/ash", "sh"),
                  w.hardlink("bin/link", "bin/sh", mode=0o755), w.char_device("null", 1, 3),
                  w.file("etc/gone", "x"), w.directory("opq"), w.file("opq/old", "o"),
                  w.file("etc/owned", "o", uid=1000, gid=1000, mode=0o600)])
    l2 = w.layer([w.whiteout("etc/gone"), w.file("etc/new", "new"), w.opaque_whiteout("opq"),
                  w.file("opq/fresh", "f"),
                  w.file("x/y/z", "deep", pax={"SCHILY.xattr.user.foo": "bar"})],
                 w.Compression.ZSTD)
    l3 = w.layer([w.file("top", "t")], w.Compression.NONE)
    return w.build_image([l1, l2, l3])


def _archive(tmp: Path, name: str, image: w.Image) -> str:
    path = tmp / f"{re.sub(r'[^a-z0-9]', '_', name)}.tar"
    w.write_oci_archive(path, {name: image})
    return str(path)


def _import(d, archive: str, *extra: str) -> None:
    d.ctr("images", "import", *extra, archive)
    # The import's lease is deleted as ctr exits, and the collector runs right after. A
    # snapshot made by `ctr snapshots view` has no gc.root label, so in either daemon
    # it would be fair game for that run: let it pass first.
    time.sleep(0.5)


def _snapshots(d, *extra: str) -> list[tuple[str, str, str]]:
    out = d.ctr("snapshots", *extra, "ls").stdout.splitlines()[1:]
    rows = []
    for line in out:
        parts = line.split()
        rows.append((parts[0], parts[1], parts[2]) if len(parts) == 3
                    else (parts[0], "", parts[1]))
    return sorted(rows)


def _top(rows: list[tuple[str, str, str]]) -> str:
    parents = {p for _, p, _ in rows}
    tops = [k for k, _, _ in rows if k not in parents]
    assert len(tops) == 1, rows
    return tops[0]


def _mounts(d, key: str, target: str, *extra: str) -> list[str]:
    return d.ctr("snapshots", *extra, "mounts", target, key).stdout.strip().splitlines()


@contextmanager
def mounted(d, key: str, *extra: str) -> Iterator[Path]:
    target = Path(tempfile.mkdtemp(prefix="ctrd-mnt-", dir="/tmp"))
    try:
        for line in _mounts(d, key, str(target), *extra):
            subprocess.run(line, shell=True, check=True)
        yield target
    finally:
        subprocess.run(["umount", "-R", str(target)], capture_output=True)
        target.rmdir()


def _tree(root: Path) -> dict[str, tuple]:
    found = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        rel = str(path.relative_to(root))
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        link = os.readlink(path) if path.is_symlink() else None
        found[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, data, link)
    return found


def _normalise_mounts(lines: list[str], root: Path) -> list[str]:
    text = "\n".join(lines).replace(str(root), "ROOT")
    return re.sub(r"/snapshots/\d+/", "/snapshots/N/", text).splitlines()


@requires_containerd
def test_import_matches_containerd(ctrd, containerd_ref, tmp_path):
    archive = _archive(tmp_path, "docker.io/library/base:1", _base_image())
    for d in (ctrd, containerd_ref):
        _import(d, archive)
    ours, theirs = _snapshots(ctrd), _snapshots(containerd_ref)
    assert ours == theirs
    assert ctrd.ctr("snapshots", "tree").stdout == containerd_ref.ctr("snapshots", "tree").stdout
    top = _top(ours)

    def content_labels(d) -> list[str]:
        return sorted(d.ctr("content", "ls").stdout.split("\n")[1:])

    def strip_age(lines: list[str]) -> list[tuple[str, list[str]]]:
        # Go prints label maps in random order: compare them as sets.
        return [(line.split("\t")[0], sorted(line.split("\t")[-1].split(",")))
                for line in lines if line]

    # Only the blobs of the image itself: which archive index blobs survive the import is
    # the content store's business, not the unpacker's.
    ours_labels = dict(strip_age(content_labels(ctrd)))
    ref_labels = dict(strip_age(content_labels(containerd_ref)))
    assert {k: ref_labels[k] for k in ours_labels} == ours_labels
    for d in (ctrd, containerd_ref):
        d.ctr("snapshots", "view", "v", top)
        d.ctr("snapshots", "prepare", "a", top)
        d.ctr("snapshots", "prepare", "first")
    for d in (ctrd, containerd_ref):
        r = d.ctr("snapshots", "mounts", "/mnt", top, check=False)
        assert r.returncode != 0 and "not active or view" in r.stderr
    for key in ("v", "a", "first"):
        assert _normalise_mounts(_mounts(ctrd, key, "/mnt"), ctrd.root) == \
            _normalise_mounts(_mounts(containerd_ref, key, "/mnt"), containerd_ref.root)
    for key in ("v", "a", "first", top):
        info = [json.loads(d.ctr("snapshots", "info", key).stdout) for d in (ctrd, containerd_ref)]
        for i in info:
            i.pop("Created"), i.pop("Updated")
            i.get("Labels", {}).pop("containerd.io/gc.root", None)
        assert info[0] == info[1]
    for d in (ctrd, containerd_ref):
        assert d.ctr("snapshots", "rm", top, check=False).returncode != 0
    with mounted(ctrd, "v") as ours_root, mounted(containerd_ref, "v") as ref_root:
        ours_tree = _tree(ours_root)
        assert ours_tree == _tree(ref_root)
        assert "etc/gone" not in ours_tree and "opq/old" not in ours_tree
        assert os.getxattr(ours_root / "x/y/z", "user.foo") == b"bar"
    usage_ours = ctrd.ctr("snapshots", "usage", top).stdout
    usage_ref = containerd_ref.ctr("snapshots", "usage", top).stdout
    assert usage_ours == usage_ref


def test_native_snapshotter_import(ctrd, tmp_path):
    archive = _archive(tmp_path, "docker.io/library/base:1", _base_image())
    _import(ctrd, archive, "--snapshotter", "native")
    top = _top(_snapshots(ctrd, "--snapshotter", "native"))
    ctrd.ctr("snapshots", "--snapshotter", "native", "view", "v", top)
    mounts = _mounts(ctrd, "v", "/mnt", "--snapshotter", "native")
    assert len(mounts) == 1 and "-t bind" in mounts[0] and "rbind,ro" in mounts[0]
    with mounted(ctrd, "v", "--snapshotter", "native") as root:
        tree = _tree(root)
    assert {"etc/hello", "etc/new", "opq/fresh", "top", "bin/link"} <= tree.keys()
    assert "etc/gone" not in tree and "opq/old" not in tree


def test_write_commit_diff_reapplies(ctrd, tmp_path):
    base = _base_image()
    _import(ctrd, _archive(tmp_path, "docker.io/library/base:1", base))
    top = _top(_snapshots(ctrd))
    ctrd.ctr("snapshots", "prepare", "work", top)
    with mounted(ctrd, "work") as root:
        (root / "etc/hello").write_text("changed\n")
        (root / "added").mkdir()
        (root / "added/file").write_bytes(os.urandom(10_000))
        os.link(root / "added/file", root / "added/hard")
        os.unlink(root / "top")
        subprocess.run(["rm", "-rf", str(root / "x")], check=True)
        os.symlink("/etc/hello", root / "abs-link")
    ctrd.ctr("snapshots", "commit", "done", "work")
    with _view(ctrd, "done") as expected_root:
        expected = _tree(expected_root)
    blob = subprocess.run(["ctr", "--address", ctrd.address, "snapshots", "diff", "done"],
                          capture_output=True, check=True).stdout
    diff_id = str(digests.of_bytes(igzip.decompress(blob)))
    layer = w.Layer(w.Blob(mediatypes.OCI_LAYER_GZIP, blob), diff_id)
    image = w.build_image([*base.layers, layer])
    _import(ctrd, _archive(tmp_path, "docker.io/library/again:1", image))
    rows = _snapshots(ctrd)
    new_top = [k for k, p, _ in rows if p == top and k not in ("done",)]
    assert len(new_top) == 1
    with _view(ctrd, new_top[0]) as got_root:
        got = _tree(got_root)
    assert got == expected
    assert "top" not in got and "x" not in got and got["abs-link"][5] == "/etc/hello"


@contextmanager
def _view(d, key: str) -> Iterator[Path]:
    name = f"view-{abs(hash(key)) % 10**8}"
    d.ctr("snapshots", "view", name, key)
    try:
        with mounted(d, name) as root:
            yield root
    finally:
        d.ctr("snapshots", "rm", name, check=False)


@pytest.mark.slow
def test_deep_chain_mounts(ctrd):
    from ctrd.daemon.snapshots.mounts import Mount, mount, unmount
    depth = 90
    parent = ""
    for i in range(depth):
        ctrd.ctr("snapshots", "prepare", f"a{i}", *([parent] if parent else []))
        root = ctrd.root / "io.containerd.snapshotter.v1.overlayfs/snapshots" / str(i + 1) / "fs"
        (root / f"f{i}").write_text(str(i))
        ctrd.ctr("snapshots", "commit", f"c{i}", f"a{i}")
        parent = f"c{i}"
    ctrd.ctr("snapshots", "view", "deep", parent)
    line = _mounts(ctrd, "deep", "/x")[0]
    opts = line.split(" -o ", 1)[1]
    assert len(opts) > os.sysconf("SC_PAGE_SIZE")
    target = tempfile.mkdtemp(prefix="ctrd-deep-", dir="/tmp")
    try:
        mount(Mount("overlay", "overlay", tuple(opts.split(","))), target)
        try:
            assert len(os.listdir(target)) == depth
        finally:
            unmount(target)
        # The shim mounts the same records its own way (chdir + relative lowerdirs).
        from ctrd.shim import mount as shim_mount
        shim_mount.mount(shim_mount.Mount("overlay", "overlay", tuple(opts.split(","))), target)
        try:
            assert len(os.listdir(target)) == depth
        finally:
            shim_mount.unmount_all(target)
    finally:
        os.rmdir(target)


# -- hostile layers through `ctr images import` ---------------------------------------


def _hostile(kind: str) -> w.Image:
    good = w.layer([w.file("ok", "fine")])
    if kind == "diffid":
        bad = w.layer([w.file("a", "1")])
        bad = w.Layer(bad.blob, "sha256:" + "0" * 64)
    elif kind == "truncated-gzip":
        full = w.layer([w.file("f", os.urandom(300_000))])
        bad = w.Layer(w.Blob(full.blob.media_type, full.blob.data[:len(full.blob.data) // 2]),
                      full.diff_id)
    elif kind == "whiteout-dotdot":
        bad = w.layer([w.file("sub/x"), w.file("sub/.wh..")])
    elif kind == "hardlink-escape":
        bad = w.layer([w.hardlink("passwd", "../../../../../../etc/passwd")])
    else:
        raise AssertionError(kind)
    return w.build_image([good, bad])


@pytest.mark.parametrize("kind", ["diffid", "truncated-gzip", "whiteout-dotdot",
                                  "hardlink-escape"])
def test_hostile_layer_import_fails_cleanly(ctrd, tmp_path, kind):
    archive = _archive(tmp_path, f"docker.io/library/{kind}:1", _hostile(kind))
    r = ctrd.ctr("images", "import", archive, check=False)
    assert r.returncode != 0
    message = r.stderr.lower()
    assert {"diffid": "wrong diff id", "truncated-gzip": "truncated",
            "whiteout-dotdot": "invalid whiteout",
            "hardlink-escape": "hard link target"}[kind] in message, r.stderr
    # The good first layer may or may not still be there: once ctr drops its lease the
    # collector may take it, as containerd's would. Partial snapshots must never stay.
    snapdir = ctrd.root / "io.containerd.snapshotter.v1.overlayfs/snapshots"
    deadline = time.monotonic() + 10
    while True:
        rows = _snapshots(ctrd)
        dirs = sorted(os.listdir(snapdir))
        if len(dirs) == len(rows) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not [k for k, _, _ in rows if k.startswith("extract-")]
    assert len(rows) <= 1
    assert dirs == (["1"] if rows else [])
