from ctrd.api.containerd.types import platform_pb2 as _platform_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageImportStream(_message.Message):
    __slots__ = ("stream", "media_type", "force_compress")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    FORCE_COMPRESS_FIELD_NUMBER: _ClassVar[int]
    stream: str
    media_type: str
    force_compress: bool
    def __init__(self, stream: _Optional[str] = ..., media_type: _Optional[str] = ..., force_compress: _Optional[bool] = ...) -> None: ...

class ImageExportStream(_message.Message):
    __slots__ = ("stream", "media_type", "platforms", "all_platforms", "skip_docker_manifest", "skip_non_distributable")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    ALL_PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    SKIP_DOCKER_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SKIP_NON_DISTRIBUTABLE_FIELD_NUMBER: _ClassVar[int]
    stream: str
    media_type: str
    platforms: _containers.RepeatedCompositeFieldContainer[_platform_pb2.Platform]
    all_platforms: bool
    skip_docker_manifest: bool
    skip_non_distributable: bool
    def __init__(self, stream: _Optional[str] = ..., media_type: _Optional[str] = ..., platforms: _Optional[_Iterable[_Union[_platform_pb2.Platform, _Mapping]]] = ..., all_platforms: _Optional[bool] = ..., skip_docker_manifest: _Optional[bool] = ..., skip_non_distributable: _Optional[bool] = ...) -> None: ...
