"""Wire facts of the generated CRI v1 descriptors that kubelet and crictl rely on.

A regression here means a client would get UNIMPLEMENTED or decode fields into the
wrong slots, so the numbers below are the upstream cri-api ones, not our choice.
"""
from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ctrd.api.k8s.cri.runtime.v1 import api_pb2, api_pb2_grpc

FILE = api_pb2.DESCRIPTOR

RUNTIME_METHODS = [
    "Version",
    "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "PodSandboxStatus", "ListPodSandbox",
    "CreateContainer", "StartContainer", "StopContainer", "RemoveContainer", "ListContainers",
    "ContainerStatus", "UpdateContainerResources", "ReopenContainerLog",
    "ExecSync", "Exec", "Attach", "PortForward",
    "ContainerStats", "ListContainerStats", "PodSandboxStats", "ListPodSandboxStats",
    "UpdateRuntimeConfig", "Status", "CheckpointContainer", "GetContainerEvents",
    "ListMetricDescriptors", "ListPodSandboxMetrics", "RuntimeConfig",
]
IMAGE_METHODS = ["ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo"]


def field(message: str, name: str) -> FieldDescriptor:
    msg: Descriptor = FILE.message_types_by_name[message]
    return msg.fields_by_name[name]


def test_package_gives_kubelets_method_paths() -> None:
    assert FILE.package == "runtime.v1"
    svc = FILE.services_by_name["RuntimeService"]
    assert svc.full_name == "runtime.v1.RuntimeService"
    assert svc.methods_by_name["Version"].full_name == "runtime.v1.RuntimeService.Version"


@pytest.mark.parametrize(("service", "methods"),
                         [("RuntimeService", RUNTIME_METHODS), ("ImageService", IMAGE_METHODS)])
def test_service_method_lists(service: str, methods: list[str]) -> None:
    assert [m.name for m in FILE.services_by_name[service].methods] == methods


def test_only_container_events_stream() -> None:
    for svc in FILE.services_by_name.values():
        for method in svc.methods:
            streams = (method.client_streaming, method.server_streaming)
            if method.name == "GetContainerEvents":
                assert streams == (False, True)
                assert method.input_type.name == "GetEventsRequest"
                assert method.output_type.name == "ContainerEventResponse"
            else:
                assert streams == (False, False), method.full_name


@pytest.mark.parametrize(("message", "name", "number", "kind"), [
    ("PodSandboxConfig", "metadata", 1, FieldDescriptor.TYPE_MESSAGE),
    ("PodSandboxConfig", "log_directory", 3, FieldDescriptor.TYPE_STRING),
    ("PodSandboxConfig", "linux", 8, FieldDescriptor.TYPE_MESSAGE),
    ("ContainerConfig", "log_path", 11, FieldDescriptor.TYPE_STRING),
    ("ContainerConfig", "linux", 15, FieldDescriptor.TYPE_MESSAGE),
    ("ContainerConfig", "CDI_devices", 17, FieldDescriptor.TYPE_MESSAGE),
    ("ExecSyncRequest", "timeout", 3, FieldDescriptor.TYPE_INT64),
    ("ExecSyncResponse", "stdout", 1, FieldDescriptor.TYPE_BYTES),
    ("ImageSpec", "image", 1, FieldDescriptor.TYPE_STRING),
    ("ImageSpec", "user_specified_image", 18, FieldDescriptor.TYPE_STRING),
    ("ImageSpec", "runtime_handler", 19, FieldDescriptor.TYPE_STRING),
    ("Namespace", "options", 2, FieldDescriptor.TYPE_MESSAGE),
    ("LinuxSandboxSecurityContext", "run_as_group", 8, FieldDescriptor.TYPE_MESSAGE),
    ("AttachRequest", "stdin", 2, FieldDescriptor.TYPE_BOOL),
    ("AttachRequest", "tty", 3, FieldDescriptor.TYPE_BOOL),
    ("ContainerStatus", "exit_code", 7, FieldDescriptor.TYPE_INT32),
    ("PullImageResponse", "image_ref", 1, FieldDescriptor.TYPE_STRING),
])
def test_field_numbers_and_types(message: str, name: str, number: int, kind: int) -> None:
    f = field(message, name)
    assert (f.number, f.type) == (number, kind)


def test_maps_and_repeated_fields() -> None:
    labels = field("PodSandboxConfig", "labels")
    assert labels.message_type.GetOptions().map_entry
    assert field("ContainerConfig", "mounts").is_repeated
    assert field("PortForwardRequest", "port").is_repeated
    assert field("PortForwardRequest", "port").type == FieldDescriptor.TYPE_INT32


def test_enum_values() -> None:
    assert dict(api_pb2.ContainerState.items()) == {
        "CONTAINER_CREATED": 0, "CONTAINER_RUNNING": 1,
        "CONTAINER_EXITED": 2, "CONTAINER_UNKNOWN": 3,
    }
    assert dict(api_pb2.NamespaceMode.items()) == {"POD": 0, "CONTAINER": 1, "NODE": 2, "TARGET": 3}
    assert dict(api_pb2.SecurityProfile.ProfileType.items()) == {
        "RuntimeDefault": 0, "Unconfined": 1, "Localhost": 2,
    }


def test_encoding_matches_hand_built_bytes() -> None:
    # ImageSpec{image="x"} is tag (1<<3)|2, length 1, "x" on the wire.
    assert api_pb2.ImageSpec(image="x").SerializeToString() == b"\x0a\x01x"
    # ExecSyncRequest{timeout=5}: tag (3<<3)|0 then varint 5.
    assert api_pb2.ExecSyncRequest(timeout=5).SerializeToString() == b"\x18\x05"


def test_grpc_stubs_exist() -> None:
    assert hasattr(api_pb2_grpc, "RuntimeServiceServicer")
    assert hasattr(api_pb2_grpc, "ImageServiceStub")
    assert callable(api_pb2_grpc.add_RuntimeServiceServicer_to_server)
    assert callable(api_pb2_grpc.add_ImageServiceServicer_to_server)
