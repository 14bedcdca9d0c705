"""Images: names pointing at a target descriptor (index or manifest) in the content store."""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ctrd import filters
from ctrd.errors import AlreadyExists, InvalidArgument, NotFound
from ctrd.oci import digest as digests

from . import labels as labelutil
from .db import Database
from .namespaces import ensure


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Image:
    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


def _validate(image: Image) -> None:
    if not image.name:
        raise InvalidArgument("image name must not be empty")
    labelutil.validate(image.labels, "image.Labels")
    target = image.target
    try:
        digests.validate(target.digest)
    except InvalidArgument as exc:
        raise InvalidArgument(f"Target.Digest {target.digest!r} invalid: {exc}") from None
    if target.size <= 0:
        raise InvalidArgument("Target.Size must be greater than zero")
    if not target.media_type:
        raise InvalidArgument("Target.MediaType must be set")


def _from_row(row: sqlite3.Row) -> Image:
    return Image(row["name"],
                 Descriptor(row["media_type"], row["digest"], row["size"],
                            labelutil.loads(row["annotations"])),
                 labelutil.loads(row["labels"]), row["created_at"], row["updated_at"])


def _adaptor(image: Image) -> filters.Adaptor:
    return filters.adapt({
        "name": image.name,
        "target": {"digest": image.target.digest, "mediatype": image.target.media_type},
        "labels": image.labels,
        "annotations": image.target.annotations,
    })


def _apply(current: Image, new: Image, paths: Sequence[str]) -> Image:
    updated = replace(current, labels=dict(current.labels),
                      target=replace(current.target,
                                     annotations=dict(current.target.annotations)))
    for path in paths:
        if path.startswith("labels."):
            key = path[len("labels."):]
            updated.labels[key] = new.labels.get(key, "")
        elif path.startswith("annotations."):
            key = path[len("annotations."):]
            updated.target.annotations[key] = new.target.annotations.get(key, "")
        elif path == "labels":
            updated.labels = dict(new.labels)
        elif path == "target":
            updated.target = replace(new.target, annotations=dict(new.target.annotations))
        elif path == "annotations":
            updated.target.annotations = dict(new.target.annotations)
        else:
            raise InvalidArgument(f'cannot update "{path}" field on image "{current.name}"')
    return updated


def _write(conn: sqlite3.Connection, namespace: str, image: Image) -> None:
    # Empty values mean "no such label", as containerd stores them.
    image.labels = {k: v for k, v in image.labels.items() if v}
    image.target.annotations = {k: v for k, v in image.target.annotations.items() if v}
    conn.execute(
        "INSERT OR REPLACE INTO images(namespace, name, media_type, digest, size, annotations, "
        "labels, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (namespace, image.name, image.target.media_type, image.target.digest, image.target.size,
         labelutil.dumps(image.target.annotations), labelutil.dumps(image.labels),
         image.created_at, image.updated_at))


class ImageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, namespace: str, name: str) -> Image:
        row = await self.db.read(lambda c: c.execute(
            "SELECT * FROM images WHERE namespace=? AND name=?", (namespace, name)).fetchone())
        if row is None:
            raise NotFound(f'image "{name}": not found')
        return _from_row(row)

    async def list(self, namespace: str, filter_exprs: Sequence[str] = ()) -> list[Image]:
        matcher = filters.parse_all(list(filter_exprs))
        rows = await self.db.read(lambda c: c.execute(
            "SELECT * FROM images WHERE namespace=? ORDER BY name", (namespace,)).fetchall())
        return [img for img in map(_from_row, rows) if matcher.match(_adaptor(img))]

    async def create(self, namespace: str, image: Image) -> Image:
        _validate(image)
        now = time.time_ns()
        image = replace(image, created_at=now, updated_at=now)

        def tx(conn: sqlite3.Connection) -> None:
            ensure(conn, namespace)
            if conn.execute("SELECT 1 FROM images WHERE namespace=? AND name=?",
                            (namespace, image.name)).fetchone():
                raise AlreadyExists(f'image "{image.name}": already exists')
            _write(conn, namespace, image)

        await self.db.write(tx)
        return image

    async def update(self, namespace: str, image: Image, paths: Sequence[str] = ()) -> Image:
        if not image.name:
            raise InvalidArgument("image name is required for update")

        def tx(conn: sqlite3.Connection) -> Image:
            row = conn.execute("SELECT * FROM images WHERE namespace=? AND name=?",
                               (namespace, image.name)).fetchone()
            if row is None:
                raise NotFound(f'image "{image.name}": not found')
            current = _from_row(row)
            updated = _apply(current, image, paths) if paths else replace(image)
            _validate(updated)
            updated.created_at = current.created_at
            updated.updated_at = time.time_ns()
            _write(conn, namespace, updated)
            return updated

        return await self.db.write(tx)

    async def delete(self, namespace: str, name: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM images WHERE namespace=? AND name=?",
                            (namespace, name)).rowcount == 0:
                raise NotFound(f'image "{name}": not found')

        await self.db.write(tx)
