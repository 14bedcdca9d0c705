"""containers.v1 against ctrd: `ctr containers` and raw requests for the finer points."""
from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrd.api.containerd.services.containers.v1 import containers_pb2 as cpb  # noqa: E402
from helpers.ctrd_proc import CtrdProcess  # noqa: E402
from helpers.runtime_env import OCI_SPEC_TYPE, RawClient  # noqa: E402

pytestmark = pytest.mark.integration


def test_ctr_containers(ctrd: CtrdProcess, tmp_path: Path) -> None:
    ctrd.ctr("containers", "create", "--rootfs", "--label", "a=b", str(tmp_path), "c1", "/bin/sh")
    ctrd.ctr("containers", "create", "--rootfs", "--label", "a=x", str(tmp_path), "c2", "/bin/sh")
    assert ctrd.ctr("containers", "ls", "-q").stdout.split() == ["c1", "c2"]
    assert ctrd.ctr("containers", "ls", "-q", "labels.a==b").stdout.split() == ["c1"]
    ctrd.ctr("containers", "label", "c1", "a=", "c=d")
    assert '"c": "d"' in ctrd.ctr("containers", "info", "c1").stdout
    assert ctrd.ctr("containers", "ls", "-q", "labels.a").stdout.split() == ["c2"]
    r = ctrd.ctr("containers", "create", "--rootfs", str(tmp_path), "c1", "/bin/sh", check=False)
    assert r.returncode != 0 and "already exists" in r.stderr
    ctrd.ctr("containers", "rm", "c1", "c2")
    assert ctrd.ctr("containers", "ls", "-q").stdout.strip() == ""


def test_raw_fields_round_trip(ctrd: CtrdProcess) -> None:
    raw = RawClient(ctrd.address)
    try:
        spec = b'{"ociVersion":"1.0.2","process":{"args":["x"]}}'
        c = cpb.Container(id="r1", image="img:1", snapshotter="overlayfs", snapshot_key="k1",
                          labels={"l": "v"})
        c.runtime.name = "io.containerd.runc.v2"
        c.runtime.options.type_url = "containerd.runc.v1.Options"
        c.runtime.options.value = b"\x08\x01"
        c.spec.type_url = OCI_SPEC_TYPE
        c.spec.value = spec
        c.extensions["ext"].type_url = "some.Type"
        c.extensions["ext"].value = b"\x00\xff"
        created = raw.containers.Create(cpb.CreateContainerRequest(container=c),
                                        metadata=raw.md).container
        got = raw.containers.Get(cpb.GetContainerRequest(id="r1"), metadata=raw.md).container
        assert got == created
        for field in ("image", "snapshotter", "snapshot_key", "labels", "runtime", "spec",
                      "extensions"):
            assert getattr(got, field) == getattr(c, field), field
        assert got.created_at.ToNanoseconds() > 0

        upd = cpb.Container(id="r1", image="img:2", labels={"l": "", "m": "n"})
        mask = field_mask_pb2.FieldMask(paths=["image", "labels.l", "labels.m"])
        got = raw.containers.Update(cpb.UpdateContainerRequest(container=upd, update_mask=mask),
                                    metadata=raw.md).container
        assert (got.image, dict(got.labels), got.spec.value) == ("img:2", {"m": "n"}, spec)
        assert got.updated_at.ToNanoseconds() > got.created_at.ToNanoseconds()

        for paths, code in [(["runtime"], grpc.StatusCode.INVALID_ARGUMENT),
                            ([], grpc.StatusCode.INVALID_ARGUMENT)]:
            with pytest.raises(grpc.RpcError) as info:
                raw.containers.Update(cpb.UpdateContainerRequest(
                    container=upd, update_mask=field_mask_pb2.FieldMask(paths=paths)),
                    metadata=raw.md)
            assert info.value.code() == code
        streamed = list(raw.containers.ListStream(cpb.ListContainersRequest(
            filters=["image==img:2"]), metadata=raw.md))
        assert [m.container.id for m in streamed] == ["r1"]
        with pytest.raises(grpc.RpcError) as info:
            raw.containers.Get(cpb.GetContainerRequest(id="nope"), metadata=raw.md)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        raw.containers.Delete(cpb.DeleteContainerRequest(id="r1"), metadata=raw.md)
    finally:
        raw.close()
