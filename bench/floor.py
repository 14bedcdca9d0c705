"""The floor: `runc run` on a prepared bundle, no daemon, no shim, no image store.

What is left is the kernel's and runc's own cost of a container's lifecycle, the
part no daemon can make cheaper.
"""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from ctrd.oci import writer


@dataclass
class RuncBundle:
    base: Path  # holds the bundle and runc's own state root

    @property
    def bundle(self) -> Path:
        return self.base / "bundle"

    @property
    def runc_root(self) -> Path:
        return self.base / "runc-state"

    def prepare(self, image: writer.Image) -> None:
        rootfs = self.bundle / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        for item in image.layers:
            # "r:*" reads plain and gzip layers, which is all the busybox image holds.
            with tarfile.open(fileobj=io.BytesIO(item.blob.data), mode="r:*") as tar:
                tar.extractall(rootfs, filter="fully_trusted")
        subprocess.run(["runc", "spec", "--bundle", str(self.bundle)], check=True)
        config_path = self.bundle / "config.json"
        spec = json.loads(config_path.read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = ["/bin/true"]
        spec["root"]["readonly"] = True
        config_path.write_text(json.dumps(spec))

    def run_once(self, container_id: str) -> float:
        start = time.perf_counter()
        subprocess.run(["runc", "--root", str(self.runc_root), "run", "--bundle",
                        str(self.bundle), container_id], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
        return time.perf_counter() - start

    def cleanup(self) -> None:
        """Remove containers a failed run left in runc's state."""
        if not self.runc_root.exists():
            return
        for entry in self.runc_root.iterdir():
            subprocess.run(["runc", "--root", str(self.runc_root), "delete", "--force",
                            entry.name], check=False, capture_output=True)
