"""containerd.services.images.v1.Images over the image store."""
from __future__ import annotations

from google.protobuf import empty_pb2

from ctrd.api.containerd.events import image_pb2 as ev
from ctrd.api.containerd.services.images.v1 import images_pb2 as pb
from ctrd.api.containerd.types import descriptor_pb2
from ctrd.errors import InvalidArgument
from ctrd.protoutil import timestamp

from ..events.exchange import Exchange
from ..gc.scheduler import Scheduler
from ..metadata.images import Descriptor, Image, ImageStore
from ..plugin import EVENT, GC, SERVICE, InitContext
from .context import namespace
from .interceptor import Registrar


def _to_pb(image: Image) -> pb.Image:
    t = image.target
    return pb.Image(name=image.name, labels=image.labels,
                    target=descriptor_pb2.Descriptor(media_type=t.media_type, digest=t.digest,
                                                     size=t.size, annotations=t.annotations),
                    created_at=timestamp(image.created_at),
                    updated_at=timestamp(image.updated_at))


def _from_pb(msg: pb.Image) -> Image:
    t = msg.target
    return Image(msg.name, Descriptor(t.media_type, t.digest, t.size, dict(t.annotations)),
                 dict(msg.labels))


class ImagesService:
    def __init__(self, store: ImageStore, events: Exchange, gc: Scheduler) -> None:
        self.store = store
        self.events = events
        self.gc = gc

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Images"], self)

    async def Get(self, request: pb.GetImageRequest, context) -> pb.GetImageResponse:
        return pb.GetImageResponse(image=_to_pb(await self.store.get(namespace(context),
                                                                     request.name)))

    async def List(self, request: pb.ListImagesRequest, context) -> pb.ListImagesResponse:
        images = await self.store.list(namespace(context), list(request.filters))
        return pb.ListImagesResponse(images=[_to_pb(i) for i in images])

    async def Create(self, request: pb.CreateImageRequest, context) -> pb.CreateImageResponse:
        ns = namespace(context)
        if not request.image.name:
            raise InvalidArgument("Image.Name required")
        image = await self.store.create(ns, _from_pb(request.image))
        await self.events.publish(ns, "/images/create",
                                  ev.ImageCreate(name=image.name, labels=image.labels))
        return pb.CreateImageResponse(image=_to_pb(image))

    async def Update(self, request: pb.UpdateImageRequest, context) -> pb.UpdateImageResponse:
        ns = namespace(context)
        if not request.image.name:
            raise InvalidArgument("Image.Name required")
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        image = await self.store.update(ns, _from_pb(request.image), paths)
        await self.events.publish(ns, "/images/update",
                                  ev.ImageUpdate(name=image.name, labels=image.labels))
        # Retargeting an image can leave its old content unreferenced.
        self.gc.mark_dirty()
        return pb.UpdateImageResponse(image=_to_pb(image))

    async def Delete(self, request: pb.DeleteImageRequest, context) -> empty_pb2.Empty:
        ns = namespace(context)
        await self.store.delete(ns, request.name)
        await self.events.publish(ns, "/images/delete", ev.ImageDelete(name=request.name))
        if request.sync:
            await self.gc.collect()
        else:
            self.gc.mark_dirty()
        return empty_pb2.Empty()


def init(ctx: InitContext) -> ImagesService:
    return ImagesService(ctx.get(SERVICE, "images-service"), ctx.get(EVENT),
                         ctx.get(GC, "scheduler"))
