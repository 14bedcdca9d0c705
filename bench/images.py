"""The images both daemons are measured with, built by ctrd.oci and never stored in the repo.

Three images: the busybox one every lifecycle workload runs, a pause-like busybox
for CRI's sandboxes, and a large multi-layer Debian image (a debootstrapped minbase
rootfs split into several layers) for import and pull. The Debian archive costs minutes to build, so it is cached under
/var/tmp/ctrd-bench-cache and reused until CACHE_VERSION changes.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from ctrd.oci import busybox, writer

CACHE = Path("/var/tmp/ctrd-bench-cache")
# Bump when the way the Debian image is built changes, so stale caches are not reused.
CACHE_VERSION = 1
SUITE = "bookworm"
# Folders whose contents get a layer each, stacked on a base holding everything else;
# the biggest trees of a minbase rootfs, so the layers come out of comparable size.
SPLIT_DIRS = ("usr/lib", "usr/share", "usr/bin", "var")

log = structlog.get_logger()


@dataclass(frozen=True)
class BenchImage:
    name: str  # the name the archive carries and `ctr images import` registers
    archive: Path  # an OCI archive holding that one image
    image: writer.Image
    note: str = ""  # why this is not the image that was asked for, if it is not

    @property
    def size(self) -> int:
        """Bytes of compressed blobs (what an import or a pull moves)."""
        return sum(blob.size for blob in self.image.blobs)


def busybox_image(workdir: Path, name: str = "bench.local/busybox:latest") -> BenchImage:
    image = busybox.busybox_image()
    archive = workdir / "busybox.oci.tar"
    writer.write_oci_archive(archive, {name: image})
    return BenchImage(name, archive, image)


def pause_image(workdir: Path, name: str) -> BenchImage:
    """CRI's sandbox image, made locally: busybox whose command sleeps for good, the part
    Kubernetes' pause image plays, so that no registry is needed."""
    image = busybox.busybox_image(config=writer.ImageConfig(cmd=["sleep", "1000000"]))
    archive = workdir / "pause.oci.tar"
    writer.write_oci_archive(archive, {name: image})
    return BenchImage(name, archive, image)


def debian_image(workdir: Path) -> BenchImage:
    """The Debian image, from the cache when it is there; busybox when it cannot be built."""
    name = f"bench.local/debian:{SUITE}"
    archive = CACHE / f"debian-{SUITE}-minbase-v{CACHE_VERSION}.oci.tar"
    if not archive.exists():
        try:
            _build_debian_archive(archive, name)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            log.warning("debian image unavailable, falling back to busybox", error=str(exc))
            fallback = busybox_image(workdir, "bench.local/debian-fallback:latest")
            return BenchImage(fallback.name, fallback.archive, fallback.image,
                              note=f"busybox fallback: {exc}")
    image = _read_single_image(archive)
    return BenchImage(name, archive, image)


def mirror() -> str:
    """The Debian mirror the machine's apt is configured with."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        text = path.read_text(errors="replace")
        # deb822 (".sources") and one-line forms both name the URL of the main archive.
        for url in re.findall(r"(?:URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            if url.rstrip("/").endswith("/debian"):
                return url
    return "http://deb.debian.org/debian"


def _build_debian_archive(archive: Path, name: str) -> None:
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="debian-build-", dir=CACHE))
    try:
        rootfs = build / "rootfs"
        url = mirror()
        log.info("debootstrap", suite=SUITE, mirror=url, target=str(rootfs))
        subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), url],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        layers = [writer.layer(tar) for tar in split_rootfs(rootfs)]
        history = [writer.History(created_by=f"debootstrap {SUITE} minbase, part {i}")
                   for i in range(len(layers))]
        image = writer.build_image(layers, writer.ImageConfig(cmd=("/bin/bash",)),
                                   history=history)
        partial = build / archive.name
        writer.write_oci_archive(partial, {name: image})
        os.replace(partial, archive)  # atomic: a crash never leaves a truncated cache entry
    finally:
        _remove_tree(build)


def split_rootfs(rootfs: Path) -> list[bytes]:
    """Uncompressed layer tars of ``rootfs``: a base, then one per SPLIT_DIRS entry.

    The base keeps the split folders themselves (as empty directories) so their owner
    and mode come from the layer that creates them, as in an image built in steps.
    """
    split = [d for d in SPLIT_DIRS if (rootfs / d).is_dir()]
    base = _tar(rootfs, [rootfs / child for child in sorted(os.listdir(rootfs))],
                skip={rootfs / d for d in split})
    parts = [base]
    for folder in split:
        top = rootfs / folder
        parts.append(_tar(rootfs, [top / child for child in sorted(os.listdir(top))]))
    return parts


def _tar(rootfs: Path, paths: list[Path], skip: set[Path] = frozenset()) -> bytes:
    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = writer.DEFAULT_MTIME
        info.uname = info.gname = ""
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in paths:
            _add(archive, rootfs, path, skip, normalize)
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, rootfs: Path, path: Path, skip: set[Path], normalize) -> None:
    arcname = str(path.relative_to(rootfs))
    if path in skip:
        archive.add(path, arcname=arcname, recursive=False, filter=normalize)
        return
    if path.is_dir() and not path.is_symlink() and any(s.is_relative_to(path) for s in skip):
        archive.add(path, arcname=arcname, recursive=False, filter=normalize)
        for child in sorted(os.listdir(path)):
            _add(archive, rootfs, path / child, skip, normalize)
        return
    archive.add(path, arcname=arcname, recursive=True, filter=normalize)


def _read_single_image(archive: Path) -> writer.Image:
    """Enough of the cached archive to know its blobs (for pushing and sizes)."""
    blobs: dict[str, bytes] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile():
                blobs[member.name] = tar.extractfile(member).read()
    index = json.loads(blobs["index.json"])
    manifest_desc = index["manifests"][0]
    by_digest = {f"{p.split('/')[1]}:{p.split('/')[2]}": data
                 for p, data in blobs.items() if p.startswith("blobs/")}
    manifest = json.loads(by_digest[manifest_desc["digest"]])
    root = writer.Blob(manifest_desc["mediaType"], by_digest[manifest_desc["digest"]])
    config = writer.Blob(manifest["config"]["mediaType"], by_digest[manifest["config"]["digest"]])
    layer_blobs = [writer.Blob(d["mediaType"], by_digest[d["digest"]]) for d in manifest["layers"]]
    return writer.Image(root, (root, config, *layer_blobs), config=config)


def _remove_tree(path: Path) -> None:
    # debootstrap leaves /proc and /sys mounted in the target when it fails half way.
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(str(path) + "/")), reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    shutil.rmtree(path, ignore_errors=True)
