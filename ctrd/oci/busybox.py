"""Small runnable test images built from the host's busybox, no registry needed.

The default binary is Debian's busybox-static, whose shell runs applets in-process
rather than exec'ing them; tests that depend on exec behaviour should know that.
"""
from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ctrd.oci.writer import (
    Compression, History, Image, ImageConfig, Layer, Platform, TarEntry, build_image,
    build_index, directory, file, hardlink, layer, symlink,
)

BUSYBOX = Path("/bin/busybox")
DEFAULT_CMD = ("sh",)

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """\
root:x:0:
daemon:x:1:
tty:x:5:
nogroup:x:65534:
"""


def applets(busybox: Path = BUSYBOX) -> list[str]:
    """The applet names ``busybox`` was built with."""
    listing = subprocess.run([str(busybox), "--list"], check=True, capture_output=True,
                             text=True).stdout
    return sorted(name for name in listing.split() if name and name != "busybox")


def rootfs_entries(busybox: Path = BUSYBOX, *,
                   links: Literal["hard", "sym"] = "hard") -> list[TarEntry]:
    """A minimal rootfs: /bin/busybox with every applet linked beside it, /etc/passwd,
    /etc/group, and the directories a runtime mounts over (/proc, /sys, /dev, /tmp).
    """
    entries = [
        directory("bin/"),
        directory("dev/"),
        directory("etc/"),
        directory("home/"),
        directory("proc/", 0o555),
        directory("root/", 0o700),
        directory("sys/", 0o555),
        directory("tmp/", 0o1777),
        directory("usr/"),
        directory("usr/bin/"),
        directory("var/"),
        file("bin/busybox", busybox.read_bytes(), 0o755),
    ]
    for name in applets(busybox):
        if links == "hard":
            entries.append(hardlink(f"bin/{name}", "bin/busybox", 0o755))
        else:
            entries.append(symlink(f"bin/{name}", "busybox"))
    entries += [
        # Scripts written "#!/usr/bin/env sh" are common enough to deserve it.
        symlink("usr/bin/env", "../../bin/busybox"),
        file("etc/passwd", PASSWD),
        file("etc/group", GROUP),
    ]
    return entries


def busybox_layer(compression: Compression = Compression.GZIP, *, docker: bool = False,
                  links: Literal["hard", "sym"] = "hard", busybox: Path = BUSYBOX) -> Layer:
    return layer(rootfs_entries(busybox, links=links), compression, docker=docker)


def busybox_image(*, compression: Compression = Compression.GZIP, docker: bool = False,
                  config: ImageConfig = ImageConfig(cmd=DEFAULT_CMD),
                  extra_layers: Sequence[Sequence[TarEntry] | Layer] = (),
                  links: Literal["hard", "sym"] = "hard", busybox: Path = BUSYBOX) -> Image:
    """The busybox image for the host platform, with ``extra_layers`` stacked on top.

    Extra layers given as entries are compressed like the base layer; whiteouts in
    them delete files of the layers below.
    """
    layers = [busybox_layer(compression, docker=docker, links=links, busybox=busybox)]
    for extra in extra_layers:
        layers.append(extra if isinstance(extra, Layer)
                      else layer(extra, compression, docker=docker))
    history = [History(created_by="busybox rootfs")]
    history += [History(created_by=f"test layer {i}") for i in range(1, len(layers))]
    return build_image(layers, config, docker=docker, history=history)


def multi_platform_image(platforms: Sequence[Platform], *, docker: bool = False,
                         compression: Compression = Compression.GZIP) -> Image:
    """An index with one image per platform.

    The host's platform gets the runnable busybox image; the others get a one-file
    image whose /etc/platform names it, so tests can tell which one was unpacked.
    """
    native = Platform.host()
    images = []
    for target in platforms:
        if target == native:
            images.append(busybox_image(docker=docker, compression=compression))
            continue
        marker = layer([directory("etc/"), file("etc/platform", f"{target}\n")],
                       compression, docker=docker)
        images.append(build_image([marker], ImageConfig(cmd=DEFAULT_CMD), platform=target,
                                  docker=docker))
    return build_index(images, docker=docker)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ctrd.oci.busybox --archive FILE [--name REF]``: write the default image."""
    import argparse

    from ctrd.oci.writer import write_oci_archive

    parser = argparse.ArgumentParser(description="Write the busybox image as an OCI archive.")
    parser.add_argument("--archive", required=True, help="output file (OCI archive tar)")
    parser.add_argument("--name", default="ctrd.local/busybox:latest", help="image reference")
    args = parser.parse_args(argv)
    write_oci_archive(args.archive, {args.name: busybox_image()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
