"""A raw content.v1 client for tests: what `ctr` cannot send (hostile or partial Writes)."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import grpc

from ctrd.api.containerd.services.content.v1 import content_pb2 as pb
from ctrd.api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc

from .ctrd_proc import CtrdProcess

CONTENT_DIR = "io.containerd.content.v1.content"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Client:
    """A small raw content client: Write streams built message by message."""

    def __init__(self, address: str, namespace: str = "default", lease: str | None = None):
        self.channel = grpc.insecure_channel(
            f"unix://{address}", options=[("grpc.max_receive_message_length", 64 << 20),
                                          ("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.ContentStub(self.channel)
        self.metadata = [("containerd-namespace", namespace)]
        if lease:
            self.metadata.append(("containerd-lease", lease))

    def write(self, *requests: pb.WriteContentRequest) -> list[pb.WriteContentResponse]:
        return list(self.stub.Write(iter(requests), metadata=self.metadata, timeout=30))

    def info(self, digest: str) -> pb.Info:
        return self.stub.Info(pb.InfoRequest(digest=digest), metadata=self.metadata).info

    def status(self, ref: str) -> pb.Status:
        return self.stub.Status(pb.StatusRequest(ref=ref), metadata=self.metadata).status

    def read(self, digest: str, offset: int = 0, size: int = 0) -> bytes:
        return b"".join(r.data for r in self.stub.Read(
            pb.ReadContentRequest(digest=digest, offset=offset, size=size),
            metadata=self.metadata))

    def close(self) -> None:
        self.channel.close()


def W(**kw) -> pb.WriteContentRequest:  # noqa: N802 - reads like the message it builds
    return pb.WriteContentRequest(action=pb.WRITE, **kw)


def C(**kw) -> pb.WriteContentRequest:  # noqa: N802
    return pb.WriteContentRequest(action=pb.COMMIT, **kw)


def S(**kw) -> pb.WriteContentRequest:  # noqa: N802
    return pb.WriteContentRequest(action=pb.STAT, **kw)


def wait_startup_gc(daemon: CtrdProcess) -> CtrdProcess:
    """Like containerd, ctrd collects once just after start-up; unreferenced content
    (such as what `ctr content ingest` writes) made before that would vanish."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = daemon.log()  # all of the daemon's runs: one collection per start
        if log.count("garbage collected") >= log.count("ctrd serving") > 0:
            break
        time.sleep(0.02)
    return daemon


def blob_file(daemon: CtrdProcess, digest: str) -> Path:
    alg, hex_ = digest.split(":")
    return daemon.root / CONTENT_DIR / "blobs" / alg / hex_
