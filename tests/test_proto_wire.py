"""Our proto/ tree must be wire-identical to containerd 1.6's api/ protos.

The upstream files are parsed with a few regexes (their layout is regular enough) and
compared against the descriptors generated into ctrd.api: packages, messages (nested
too), field numbers, types and cardinality, enums and services with streaming shapes.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor

UPSTREAM = Path("/usr/share/gocode/src/github.com/containerd/containerd/api")

# Upstream files (relative to api/) whose counterpart lives in proto/containerd/.
COVERED = (
    "types/descriptor.proto",
    "types/mount.proto",
    "types/platform.proto",
    "types/metrics.proto",
    "types/task/task.proto",
    "events/container.proto",
    "events/content.proto",
    "events/image.proto",
    "events/namespace.proto",
    "events/snapshot.proto",
    "events/task.proto",
    "services/content/v1/content.proto",
    "services/images/v1/images.proto",
    "services/leases/v1/leases.proto",
    "services/namespaces/v1/namespace.proto",
    "services/introspection/v1/introspection.proto",
    "services/version/v1/version.proto",
    "services/events/v1/events.proto",
    "services/diff/v1/diff.proto",
    "services/snapshots/v1/snapshots.proto",
    "services/ttrpc/events/v1/events.proto",
)

SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_FIXED32: "fixed32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
}

FIELD_RE = re.compile(
    r"^(?P<repeated>repeated\s+)?"
    r"(?:map\s*<\s*(?P<key>\w+)\s*,\s*(?P<value>[\w.]+)\s*>|(?P<type>[\w.]+))"
    r"\s+(?P<name>\w+)\s*=\s*(?P<number>\d+)"
)
ENUM_VALUE_RE = re.compile(r"^(?P<name>\w+)\s*=\s*(?P<number>-?\d+)")
RPC_RE = re.compile(
    r"^rpc\s+(?P<name>\w+)\s*\(\s*(?P<cs>stream\s+)?(?P<req>[\w.]+)\s*\)"
    r"\s*returns\s*\(\s*(?P<ss>stream\s+)?(?P<resp>[\w.]+)\s*\)"
)
BLOCK_RE = re.compile(r"^(?P<kind>message|enum|service)\s+(?P<name>\w+)\s*\{")


@dataclass
class Field:
    name: str
    number: int
    type: str  # scalar name or type reference as written upstream
    repeated: bool
    map_kv: tuple[str, str] | None
    scope: str  # full name of the enclosing message, for resolving references


@dataclass
class Block:
    kind: str
    full_name: str
    fields: dict[str, Field] = field(default_factory=dict)
    values: dict[str, int] = field(default_factory=dict)
    rpcs: dict[str, tuple[bool, str, bool, str]] = field(default_factory=dict)


@dataclass
class UpstreamFile:
    package: str
    blocks: dict[str, Block]  # by full name


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def parse_upstream(path: Path) -> UpstreamFile:
    package = ""
    blocks: dict[str, Block] = {}
    stack: list[Block | None] = []  # None for braces we don't track (options, oneofs)
    for raw in strip_comments(path.read_text()).splitlines():
        line = raw.strip()
        if not line:
            continue
        if m := re.match(r"^package\s+([\w.]+)\s*;", line):
            package = m.group(1)
            continue
        current = next((b for b in reversed(stack) if b is not None), None)
        if m := BLOCK_RE.match(line):
            parent = current.full_name if current else package
            block = Block(m["kind"], f"{parent}.{m['name']}")
            blocks[block.full_name] = block
            stack.append(block)
        elif line.startswith("}"):
            stack.pop()
        elif current is None or line.startswith("option"):
            if line.endswith("{"):
                stack.append(None)
        elif current.kind == "message" and (m := FIELD_RE.match(line)):
            kv = (m["key"], m["value"]) if m["key"] else None
            current.fields[m["name"]] = Field(
                m["name"], int(m["number"]), m["type"] or "", bool(m["repeated"]) or bool(kv),
                kv, current.full_name,
            )
        elif current.kind == "enum" and (m := ENUM_VALUE_RE.match(line)):
            current.values[m["name"]] = int(m["number"])
        elif current.kind == "service" and (m := RPC_RE.match(line)):
            current.rpcs[m["name"]] = (bool(m["cs"]), m["req"], bool(m["ss"]), m["resp"])
        elif line.endswith("{"):
            stack.append(None)
    assert not stack, f"unbalanced braces in {path}"
    return UpstreamFile(package, blocks)


def resolves_to(ref: str, scope: str, full_name: str) -> bool:
    """Whether upstream's reference `ref`, written inside `scope`, can name `full_name`."""
    ref = ref.lstrip(".")
    parts = scope.split(".")
    candidates = {ref} | {".".join(parts[:i] + [ref]) for i in range(1, len(parts) + 1)}
    return full_name in candidates


def type_name(f: FieldDescriptor) -> str:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return f.message_type.full_name
    if f.type == FieldDescriptor.TYPE_ENUM:
        return f.enum_type.full_name
    return SCALARS[f.type]


def check_type(ref: str, scope: str, ours: FieldDescriptor, where: str) -> None:
    got = type_name(ours)
    if ref in SCALARS.values():
        assert got == ref, f"{where}: type {got}, upstream {ref}"
    else:
        assert ours.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM), where
        assert resolves_to(ref, scope, got), f"{where}: type {got}, upstream {ref}"


def our_descriptors(fd: FileDescriptor) -> dict[str, object]:
    """All messages, enums and services of a file by full name (map entries left out)."""
    found: dict[str, object] = {}

    def walk(msg: Descriptor) -> None:
        if msg.GetOptions().map_entry:
            return
        found[msg.full_name] = msg
        for enum in msg.enum_types:
            found[enum.full_name] = enum
        for nested in msg.nested_types:
            walk(nested)

    for msg in fd.message_types_by_name.values():
        walk(msg)
    for enum in fd.enum_types_by_name.values():
        found[enum.full_name] = enum
    for svc in fd.services_by_name.values():
        found[svc.full_name] = svc
    return found


# Fields containerd added after 1.6 that ctrd serves too; appending fields is wire-compatible.
LATER_FIELDS = {
    "containerd.services.introspection.v1.ServerResponse": {"pid", "pidns"},
}


def compare_message(up: Block, ours: Descriptor) -> None:
    extra = LATER_FIELDS.get(up.full_name, set())
    assert set(ours.fields_by_name) - extra == set(up.fields), up.full_name
    for name, uf in up.fields.items():
        of = ours.fields_by_name[name]
        where = f"{up.full_name}.{name}"
        assert of.number == uf.number, f"{where}: number {of.number}, upstream {uf.number}"
        assert of.is_repeated == uf.repeated, f"{where}: cardinality differs"
        if uf.map_kv:
            assert of.message_type.GetOptions().map_entry, f"{where}: not a map"
            key, value = of.message_type.fields_by_name["key"], of.message_type.fields_by_name["value"]
            check_type(uf.map_kv[0], uf.scope, key, f"{where} key")
            check_type(uf.map_kv[1], uf.scope, value, f"{where} value")
        else:
            assert not (of.message_type and of.message_type.GetOptions().map_entry), where
            check_type(uf.type, uf.scope, of, where)


@pytest.mark.skipif(not UPSTREAM.is_dir(), reason="containerd api sources not installed")
@pytest.mark.parametrize("rel", COVERED)
def test_wire_identical(rel: str) -> None:
    up = parse_upstream(UPSTREAM / rel)
    module = "ctrd.api.containerd." + rel.removesuffix(".proto").replace("/", ".") + "_pb2"
    fd: FileDescriptor = importlib.import_module(module).DESCRIPTOR
    assert fd.package == up.package
    as_proto = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(as_proto)
    assert as_proto.syntax == "proto3"  # repeated scalars are packed only in proto3

    ours = our_descriptors(fd)
    assert set(ours) == set(up.blocks)
    for full_name, block in up.blocks.items():
        desc = ours[full_name]
        if block.kind == "message":
            compare_message(block, desc)
        elif block.kind == "enum":
            assert {v.name: v.number for v in desc.values} == block.values, full_name
        else:
            assert set(desc.methods_by_name) == set(block.rpcs), full_name
            scope = up.package
            for name, (cs, req, ss, resp) in block.rpcs.items():
                method = desc.methods_by_name[name]
                where = f"{full_name}.{name}"
                assert (method.client_streaming, method.server_streaming) == (cs, ss), where
                assert resolves_to(req, scope, method.input_type.full_name), where
                assert resolves_to(resp, scope, method.output_type.full_name), where


@pytest.mark.skipif(not UPSTREAM.is_dir(), reason="containerd api sources not installed")
def test_parser_sees_upstream_shapes() -> None:
    # Guards the regex parser itself: a silently empty parse would make the test above vacuous.
    up = parse_upstream(UPSTREAM / "services/content/v1/content.proto")
    svc = up.blocks["containerd.services.content.v1.Content"]
    assert svc.rpcs["Write"] == (True, "WriteContentRequest", True, "WriteContentResponse")
    info = up.blocks["containerd.services.content.v1.Info"]
    assert info.fields["labels"].map_kv == ("string", "string")
    assert up.blocks["containerd.services.content.v1.WriteAction"].values["COMMIT"] == 2
    nested = parse_upstream(UPSTREAM / "events/container.proto")
    assert "containerd.events.ContainerCreate.Runtime" in nested.blocks
