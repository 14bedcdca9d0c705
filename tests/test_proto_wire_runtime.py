"""Runtime-side protos (containers, tasks, shim v2, runc options, cgroup metrics, ttrpc
envelope) must be wire-identical to the upstream sources Debian ships.

The .proto comparison reuses the regex parser of test_proto_wire; ttrpc has no .proto
upstream, so its envelope is checked against the protobuf struct tags in types.go.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor

from test_proto_wire import compare_message, our_descriptors, parse_upstream, resolves_to

GOSRC = Path("/usr/share/gocode/src/github.com/containerd")

# (upstream file under GOSRC, our generated module)
COVERED = (
    ("containerd/api/services/containers/v1/containers.proto",
     "ctrd.api.containerd.services.containers.v1.containers_pb2"),
    ("containerd/api/services/tasks/v1/tasks.proto",
     "ctrd.api.containerd.services.tasks.v1.tasks_pb2"),
    ("containerd/runtime/v2/task/shim.proto",
     "ctrd.api.containerd.runtime.task.v2.shim_pb2"),
    ("containerd/runtime/v2/runc/options/oci.proto",
     "ctrd.api.containerd.runc.options.oci_pb2"),
    ("cgroups/stats/v1/metrics.proto", "ctrd.api.cgroups.v1.metrics_pb2"),
    ("cgroups/v2/stats/metrics.proto", "ctrd.api.cgroups.v2.metrics_pb2"),
)


def upstream_present(rel: str) -> bool:
    return (GOSRC / rel).is_file()


@pytest.mark.parametrize(("rel", "module"), COVERED, ids=[rel for rel, _ in COVERED])
def test_wire_identical(rel: str, module: str) -> None:
    if not upstream_present(rel):
        pytest.skip(f"{rel} not installed")
    up = parse_upstream(GOSRC / rel)
    fd: FileDescriptor = importlib.import_module(module).DESCRIPTOR
    assert fd.package == up.package
    as_proto = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(as_proto)
    assert as_proto.syntax == "proto3"  # packed repeated scalars depend on it

    ours = our_descriptors(fd)
    assert set(ours) == set(up.blocks)
    # Guard against a parse that silently found nothing.
    assert any(b.fields or b.rpcs for b in up.blocks.values())
    for full_name, block in up.blocks.items():
        desc = ours[full_name]
        if block.kind == "message":
            compare_message(block, desc)
        elif block.kind == "enum":
            assert {v.name: v.number for v in desc.values} == block.values, full_name
        else:
            assert set(desc.methods_by_name) == set(block.rpcs), full_name
            for name, (cs, req, ss, resp) in block.rpcs.items():
                method = desc.methods_by_name[name]
                where = f"{full_name}.{name}"
                assert (method.client_streaming, method.server_streaming) == (cs, ss), where
                assert resolves_to(req, up.package, method.input_type.full_name), where
                assert resolves_to(resp, up.package, method.output_type.full_name), where


# --- ttrpc envelope -------------------------------------------------------------------

TTRPC_TYPES = GOSRC / "ttrpc/types.go"
STRUCT_RE = re.compile(r"^type\s+(\w+)\s+struct\s*\{(.*?)^\}", re.M | re.S)
GO_FIELD_RE = re.compile(
    r"^\s*\w+\s+(?P<gotype>\S+)\s+`protobuf:\"(?P<wire>\w+),(?P<num>\d+),(?P<card>opt|rep),name=(?P<name>\w+)",
    re.M,
)
# Go field type -> what our field must be (scalar name or message short name).
GO_TYPES = {
    "string": "string",
    "[]string": "string",
    "[]byte": "bytes",
    "int64": "int64",
    "*spb.Status": "Status",
    "[]*KeyValue": "KeyValue",
}


def parse_go_structs(path: Path) -> dict[str, dict[str, tuple[int, bool, str]]]:
    structs: dict[str, dict[str, tuple[int, bool, str]]] = {}
    for m in STRUCT_RE.finditer(path.read_text()):
        fields = {
            f["name"]: (int(f["num"]), f["card"] == "rep", GO_TYPES[f["gotype"]])
            for f in GO_FIELD_RE.finditer(m.group(2))
        }
        if fields:
            structs[m.group(1)] = fields
    return structs


def short_type(f: FieldDescriptor) -> str:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return f.message_type.name
    return {
        FieldDescriptor.TYPE_STRING: "string",
        FieldDescriptor.TYPE_BYTES: "bytes",
        FieldDescriptor.TYPE_INT64: "int64",
    }.get(f.type, f"type#{f.type}")


@pytest.mark.skipif(not TTRPC_TYPES.is_file(), reason="ttrpc sources not installed")
def test_ttrpc_envelope_matches_go_tags() -> None:
    from ctrd.api.ttrpc import ttrpc_pb2

    structs = parse_go_structs(TTRPC_TYPES)
    assert set(structs) == {"Request", "Response", "StringList", "KeyValue"}
    for name, fields in structs.items():
        desc: Descriptor = ttrpc_pb2.DESCRIPTOR.message_types_by_name[name]
        assert set(desc.fields_by_name) == set(fields), name
        for fname, (number, repeated, kind) in fields.items():
            of = desc.fields_by_name[fname]
            where = f"{name}.{fname}"
            assert of.number == number, where
            assert of.is_repeated == repeated, where
            assert short_type(of) == kind, where


def test_ttrpc_status_is_google_rpc_status() -> None:
    status_pb2 = pytest.importorskip("google.rpc.status_pb2")
    from google.protobuf import any_pb2

    from ctrd.api.ttrpc import ttrpc_pb2

    theirs, ours = status_pb2.Status.DESCRIPTOR, ttrpc_pb2.Status.DESCRIPTOR
    shape = lambda d: {  # noqa: E731
        f.name: (f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name)
        for f in d.fields
    }
    assert shape(ours) == shape(theirs)

    detail = any_pb2.Any(type_url="x/y", value=b"z")
    wire = status_pb2.Status(code=5, message="not found", details=[detail]).SerializeToString()
    back = ttrpc_pb2.Status.FromString(wire)
    assert (back.code, back.message, back.details[0].value) == (5, "not found", b"z")
