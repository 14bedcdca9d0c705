"""Images from ctrd.oci import into and run on the reference containerd."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ctrd.oci import busybox, writer
from ctrd.oci.writer import Compression, ImageConfig, Platform
from helpers.containerd_ref import ContainerdRef, containerd_ref_module  # noqa: F401

pytestmark = pytest.mark.integration


def _run(ref: ContainerdRef, image: str, container: str, script: str) -> str:
    return ref.ctr("run", "--rm", image, container, "/bin/sh", "-c", script).stdout


@pytest.mark.parametrize("compression", list(Compression))
def test_oci_archive_imports_and_runs(containerd_ref_module: ContainerdRef, tmp_path: Path,
                                      compression: Compression) -> None:
    name = f"docker.io/library/ctrd-oci-{compression.name.lower()}:latest"
    archive = tmp_path / "image.tar"
    writer.write_oci_archive(archive, {name: busybox.busybox_image(compression=compression)})
    containerd_ref_module.ctr("images", "import", str(archive))
    assert name in containerd_ref_module.ctr("images", "list", "--quiet").stdout.split()
    out = _run(containerd_ref_module, name, f"t-oci-{compression.name.lower()}",
               "echo ok; id -u; cat /etc/passwd | head -n 1")
    assert out.splitlines() == ["ok", "0", "root:x:0:0:root:/root:/bin/sh"]


def test_docker_archive_imports_and_runs(containerd_ref_module: ContainerdRef,
                                         tmp_path: Path) -> None:
    archive = tmp_path / "docker.tar"
    image = busybox.busybox_image(docker=True, links="sym")
    writer.write_docker_archive(archive, {"ctrd-docker:v1": image})
    containerd_ref_module.ctr("images", "import", str(archive))
    name = "docker.io/library/ctrd-docker:v1"  # containerd normalizes familiar names
    assert name in containerd_ref_module.ctr("images", "list", "--quiet").stdout.split()
    assert _run(containerd_ref_module, name, "t-docker", "echo ok") == "ok\n"


def test_layers_config_and_whiteouts(containerd_ref_module: ContainerdRef,
                                     tmp_path: Path) -> None:
    upper = [
        writer.whiteout("etc/group"),
        writer.directory("data/"),
        writer.file("data/msg", "from layer 2\n"),
        writer.hardlink("data/msg2", "data/msg"),
        writer.symlink("data/link", "msg"),
    ]
    top = [writer.opaque_whiteout("data"), writer.file("data/only", "top\n")]
    config = ImageConfig(cmd=["sh", "-c", "echo $GREETING from $(pwd) as $(id -u)"],
                         env=[writer.DEFAULT_PATH, "GREETING=hello"],
                         working_dir="/data", user="65534")
    image = busybox.busybox_image(config=config, extra_layers=[upper, top])
    archive = tmp_path / "layers.tar"
    name = "docker.io/library/ctrd-layers:latest"
    writer.write_oci_archive(archive, {name: image})
    containerd_ref_module.ctr("images", "import", str(archive))
    out = containerd_ref_module.ctr("run", "--rm", name, "t-layers").stdout
    assert out == "hello from /data as 65534\n"
    out = _run(containerd_ref_module, name, "t-layers2",
               "ls -a /data | tr '\\n' ' '; test -e /etc/group && echo group || echo nogroup")
    assert out == ". .. only nogroup\n"


def test_multi_platform_index(containerd_ref_module: ContainerdRef, tmp_path: Path) -> None:
    other = Platform("linux", "arm64", "v8") if Platform.host().architecture != "arm64" \
        else Platform("linux", "amd64")
    image = busybox.multi_platform_image([other, Platform.host()])
    archive = tmp_path / "multi.tar"
    name = "docker.io/library/ctrd-multi:latest"
    writer.write_oci_archive(archive, {name: image})
    containerd_ref_module.ctr("images", "import", "--all-platforms", str(archive))
    listing = containerd_ref_module.ctr("images", "list").stdout
    assert "application/vnd.oci.image.index.v1+json" in listing
    assert str(other) in listing and str(Platform.host()) in listing
    assert _run(containerd_ref_module, name, "t-multi", "echo ok") == "ok\n"


def test_oci_layout_matches_skopeo_view(tmp_path: Path) -> None:
    """skopeo reads our layout directory: a second implementation agreeing on the format."""
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is needed")
    layout = tmp_path / "layout"
    writer.write_oci_layout(layout, {"docker.io/library/ctrd-layout:1.0":
                                     busybox.busybox_image()})
    out = subprocess.run(["skopeo", "inspect", "--config", f"oci:{layout}:1.0"],
                         capture_output=True, text=True, check=True).stdout
    assert '"sh"' in out


def test_reference_cleanup_leaves_nothing_behind(tmp_path: Path) -> None:
    """The fixture's teardown ends running tasks, shims, mounts and cgroups."""
    from helpers.containerd_ref import available, new_containerd

    if not available():
        pytest.skip("containerd is needed")
    ref = new_containerd()
    try:
        archive = tmp_path / "image.tar"
        name = "docker.io/library/ctrd-cleanup:latest"
        writer.write_oci_archive(archive, {name: busybox.busybox_image()})
        ref.ctr("images", "import", str(archive), namespace="ctrd-cleanup")
        ref.ctr("run", "-d", name, "left-running", "sleep", "600", namespace="ctrd-cleanup")
        pid = ref.ctr("tasks", "list", namespace="ctrd-cleanup").stdout.split()[-2]
        assert Path(f"/proc/{pid}").exists()
    finally:
        ref.cleanup()
    assert not Path(f"/proc/{pid}").exists()
    assert not ref.base.exists()
    assert str(ref.base) not in Path("/proc/mounts").read_text()
    assert not any(p.exists() for p in Path("/sys/fs/cgroup").glob("*/ctrd-cleanup"))
    shims = [p for p in Path("/proc").iterdir() if p.name.isdigit()
             and ref.address.encode() in _cmdline(p)]
    assert shims == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_reference_cleanup_after_daemon_crash(tmp_path: Path) -> None:
    """Even with containerd killed, teardown ends the container, its shim and mounts."""
    from helpers.containerd_ref import available, new_containerd

    if not available():
        pytest.skip("containerd is needed")
    ref = new_containerd()
    try:
        archive = tmp_path / "image.tar"
        name = "docker.io/library/ctrd-crash:latest"
        writer.write_oci_archive(archive, {name: busybox.busybox_image()})
        ref.ctr("images", "import", str(archive), namespace="ctrd-crash")
        ref.ctr("run", "-d", name, "orphan", "sleep", "600", namespace="ctrd-crash")
        pid = ref.ctr("tasks", "list", namespace="ctrd-crash").stdout.split()[-2]
        assert ref.proc is not None
        ref.proc.kill()
        ref.proc.wait()
    finally:
        ref.cleanup()
    assert not Path(f"/proc/{pid}").exists()
    assert not ref.base.exists()
    assert str(ref.base) not in Path("/proc/mounts").read_text()
    assert not any(p.exists() for p in Path("/sys/fs/cgroup").glob("*/ctrd-crash"))
    assert not any(ref.address.encode() in _cmdline(p) for p in Path("/proc").iterdir()
                   if p.name.isdigit())
