"""containerd.services.version.v1.Version."""
from __future__ import annotations

from google.protobuf import empty_pb2

from ctrd import __version__
from ctrd.api.containerd.services.version.v1 import version_pb2 as pb

from ..plugin import InitContext
from .interceptor import Registrar

# Clients gate features on containerd's version; ctrd implements 1.6's API, so it
# reports 1.6 with its own version as semver build metadata (ignored in comparisons).
API_VERSION = "1.6.20"


class VersionService:
    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Version"], self)

    async def Version(self, request: empty_pb2.Empty, context) -> pb.VersionResponse:
        return pb.VersionResponse(version=f"{API_VERSION}+ctrd.{__version__}", revision="ctrd")


def init(ctx: InitContext) -> VersionService:
    return VersionService()
