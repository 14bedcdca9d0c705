"""A throwaway `docker-registry` on 127.0.0.1, and a push of a ctrd.oci image into it."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ctrd.oci import writer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Registry:
    base: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        if shutil.which("docker-registry") is None:
            raise RuntimeError("docker-registry is not installed")
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        config = self.base / "config.yml"
        config.write_text(f"""\
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {self.base / 'data'}
http:
  addr: {self.host}
""")
        with open(self.base / "registry.log", "ab") as out:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out,
                                         stderr=out, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}")
            try:
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer in {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def push(self, repository: str, tag: str, image: writer.Image) -> str:
        """Upload every blob then the manifest; return the reference to pull."""
        with httpx.Client(base_url=f"http://{self.host}", timeout=300) as client:
            for blob in image.blobs:
                if blob is image.root:
                    continue
                if client.head(f"/v2/{repository}/blobs/{blob.digest}").status_code == 200:
                    continue
                start = client.post(f"/v2/{repository}/blobs/uploads/")
                start.raise_for_status()
                # A monolithic upload: one PUT with the whole blob, to the URL handed out.
                # The upload URL carries the registry's own state in its query: keep it.
                target = httpx.URL(start.headers["Location"]).copy_merge_params(
                    {"digest": blob.digest})
                upload = client.put(target, content=blob.data,
                                    headers={"Content-Type": "application/octet-stream"})
                upload.raise_for_status()
            client.put(f"/v2/{repository}/manifests/{tag}", content=image.root.data,
                       headers={"Content-Type": image.root.media_type}).raise_for_status()
        return f"{self.host}/{repository}:{tag}"
