"""Layer extraction and diffing, on plain directories: the hostile corpus lives here."""
from __future__ import annotations

import io
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest
from isal import igzip

from ctrd.errors import DataLoss, InvalidArgument
from ctrd.oci import writer as w
from ctrd.daemon.diff import apply as apply_mod


def _extract(root: Path, tar: bytes, *, overlay: bool = False, parents=()) -> None:
    apply_mod.Extractor(str(root), overlay=overlay, parents=parents).apply(io.BytesIO(tar))


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): extraction target and a sibling that must stay untouched."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    return root, outside


def test_regular_tree_keeps_metadata(box):
    root, _ = box
    tar = w.tar_entries([
        w.directory("d", mode=0o750, uid=12, gid=34),
        w.file("d/f", "data", mode=0o4755, uid=5, gid=6,
               pax={"SCHILY.xattr.user.k": "v"}),
        w.symlink("d/l", "f"),
        w.hardlink("d/h", "d/f", mode=0o4755, uid=5, gid=6),
        w.char_device("d/null", 1, 3),
        w.fifo("d/p"),
    ])
    _extract(root, tar)
    st = os.lstat(root / "d/f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 5, 6)
    assert st.st_mtime == w.DEFAULT_MTIME and st.st_nlink == 2
    assert os.getxattr(root / "d/f", "user.k") == b"v"
    assert os.readlink(root / "d/l") == "f"
    assert os.lstat(root / "d").st_mtime == w.DEFAULT_MTIME
    assert stat.S_IMODE(os.lstat(root / "d").st_mode) == 0o750
    assert os.lstat(root / "d/null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.lstat(root / "d/p").st_mode)


@pytest.mark.parametrize("name", ["../escape", "../../escape", "/escape", "./../escape",
                                  "a/../../escape"])
def test_traversal_names_stay_inside(box, name):
    root, outside = box
    _extract(root, w.tar_entries([w.file(name, "x")]))
    assert not (outside / "escape").exists()
    assert not (root.parent / "escape").exists()
    assert (root / "escape").read_text() == "x"


@pytest.mark.parametrize("target", ["/", "..", "../outside", "/../../outside"])
def test_symlinked_parent_cannot_lead_out(box, target):
    root, outside = box
    _extract(root, w.tar_entries([w.symlink("evil", target), w.file("evil/planted", "x")]))
    assert not (outside / "planted").exists()
    assert not (root.parent / "planted").exists()
    assert any(p.name == "planted" for p in root.rglob("planted"))


def test_final_symlink_is_replaced_not_followed(box):
    root, outside = box
    (outside / "victim").write_text("keep")
    _extract(root, w.tar_entries([w.symlink("f", str(outside / "victim")), w.file("f", "new")]))
    assert (outside / "victim").read_text() == "keep"
    assert not os.path.islink(root / "f") and (root / "f").read_text() == "new"


@pytest.mark.parametrize("link", ["../../../etc/passwd", "/etc/passwd", "../outside/secret"])
def test_hardlink_outside_is_refused(box, link):
    root, outside = box
    (outside / "secret").write_text("s")
    with pytest.raises(InvalidArgument):
        _extract(root, w.tar_entries([w.hardlink("stolen", link)]))
    assert os.lstat(outside / "secret").st_nlink == 1


def test_hardlink_to_root_is_refused(box):
    root, _ = box
    with pytest.raises(InvalidArgument):
        _extract(root, w.tar_entries([w.hardlink("x", "..")]))


@pytest.mark.parametrize("name", [".wh..", "sub/.wh..", ".wh.", ".wh.."])
def test_whiteout_of_dotdot_is_refused(box, name):
    root, outside = box
    (root / "sub").mkdir()
    (outside / "keep").write_text("k")
    with pytest.raises(InvalidArgument, match="invalid whiteout"):
        _extract(root, w.tar_entries([w.file(name)]))
    assert (outside / "keep").exists() and (root / "sub").is_dir()


def test_naive_whiteouts_delete(box):
    root, _ = box
    _extract(root, w.tar_entries([w.file("a/x"), w.file("a/y"), w.file("b/z"), w.file("c")]))
    _extract(root, w.tar_entries([w.whiteout("c"), w.opaque_whiteout("a"), w.file("a/new"),
                                  w.whiteout("b")]))
    assert sorted(os.listdir(root)) == ["a"]
    assert os.listdir(root / "a") == ["new"]


def test_overlay_whiteouts_become_markers(box, tmp_path):
    root, _ = box
    lower = tmp_path / "lower"
    (lower / "a").mkdir(parents=True)
    os.chown(lower / "a", 7, 8)
    os.chmod(lower / "a", 0o701)
    _extract(root, w.tar_entries([w.whiteout("a/gone"), w.opaque_whiteout("o"),
                                  w.file("a/new")]), overlay=True, parents=[str(lower)])
    st = os.lstat(root / "a/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(root / "o", "trusted.overlay.opaque") == b"y"
    # The implied parent copies the lower layer's owner and mode.
    pst = os.lstat(root / "a")
    assert (pst.st_uid, pst.st_gid, stat.S_IMODE(pst.st_mode)) == (7, 8, 0o701)


def _sparse_tar(name: str, realsize: int, data: bytes) -> bytes:
    """A PAX 1.0 sparse member: one data block at the very end of a huge file."""
    assert len(data) == 512
    offset = realsize - len(data)
    sparse_map = f"1\n{offset}\n{len(data)}\n".encode().ljust(512, b"\0")
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.size = len(sparse_map) + len(data)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": name, "GNU.sparse.realsize": str(realsize)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(sparse_map + data))
        tf.addfile(w.file("after", "ok").tarinfo(), io.BytesIO(b"ok"))
    return buf.getvalue()


def test_huge_sparse_file_keeps_its_holes(box):
    root, _ = box
    size = 1 << 40  # 1 TiB apparent size
    start = time.monotonic()
    _extract(root, _sparse_tar("big", size, b"z" * 512))
    assert time.monotonic() - start < 5
    st = os.lstat(root / "big")
    assert st.st_size == size and st.st_blocks * 512 < 1 << 20
    with open(root / "big", "rb") as f:
        f.seek(size - 512)
        assert f.read() == b"z" * 512
    assert (root / "after").read_text() == "ok"


def test_garbage_is_not_a_tar(box):
    root, _ = box
    with pytest.raises(InvalidArgument):
        _extract(root, b"\x01" * 2048)


def test_truncated_tar_fails(box):
    root, _ = box
    tar = w.tar_entries([w.file("big", b"x" * 100_000)])
    with pytest.raises(InvalidArgument):
        _extract(root, tar[:50_000])


# -- through the decompressing pipe ---------------------------------------------------


def _pipe_apply(tmp_path: Path, blob: bytes, root: Path) -> str:
    from ctrd.daemon.diff import compression
    path = tmp_path / "blob"
    path.write_bytes(blob)
    pipe = compression.DecompressingPipe(str(path), True)
    try:
        try:
            apply_mod.Extractor(str(root), overlay=False).apply(pipe.reader)
        except InvalidArgument:
            pipe.reader.close()
            err = pipe.error()
            if err is not None:
                raise err from None
            raise
        return pipe.finish()
    finally:
        pipe.close()


def test_pipe_digest_is_the_diff_id(box, tmp_path):
    root, _ = box
    layer = w.layer([w.file("a", "1"), w.file("b", b"2" * 3_000_000)])
    assert _pipe_apply(tmp_path, layer.blob.data, root) == layer.diff_id
    zlayer = w.layer([w.file("c", "3")], w.Compression.ZSTD)
    assert _pipe_apply(tmp_path, zlayer.blob.data, root) == zlayer.diff_id


def test_truncated_gzip_is_data_loss(box, tmp_path):
    root, _ = box
    data = igzip.compress(w.tar_entries([w.file("f", os.urandom(200_000))]))
    with pytest.raises(DataLoss):
        _pipe_apply(tmp_path, data[: len(data) // 2], root)


def test_corrupt_gzip_is_data_loss(box, tmp_path):
    root, _ = box
    data = bytearray(igzip.compress(w.tar_entries([w.file("f", os.urandom(200_000))])))
    for i in range(100, 400):
        data[i] ^= 0x5A
    with pytest.raises(DataLoss):
        _pipe_apply(tmp_path, bytes(data), root)
