"""Containers: the metadata record a task is started from.

A container holds its OCI spec, runtime name and options, and extensions as
``Any`` values; they are stored as (type_url, bytes) pairs and handed back
byte for byte, because clients decode them with their own type registries.
"""
from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ctrd import filters, identifiers
from ctrd.errors import AlreadyExists, InvalidArgument, NotFound

from . import labels as labelutil
from .db import Database
from .namespaces import ensure

# The type URL containerd's clients give a JSON runtime spec.
OCI_SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


@dataclass(frozen=True)
class AnyValue:
    """A protobuf Any kept as raw parts: this layer never needs to decode it."""

    type_url: str
    value: bytes = b""


@dataclass
class Container:
    id: str
    runtime_name: str = ""
    runtime_options: AnyValue | None = None
    spec: AnyValue | None = None
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    snapshotter: str = ""
    snapshot_key: str = ""
    extensions: dict[str, AnyValue] = field(default_factory=dict)
    sandbox: str = ""
    created_at: int = 0
    updated_at: int = 0

    def field(self, path: tuple[str, ...]) -> str | None:
        """Filter adaptor, with the fields containerd's container adaptor knows."""
        if not path:
            return None
        head = path[0]
        if head == "id" and len(path) == 1:
            return self.id or None
        if head == "image" and len(path) == 1:
            return self.image or None
        if head == "runtime" and path[1:] == ("name",):
            return self.runtime_name or None
        if head == "labels" and len(path) > 1:
            return self.labels.get(".".join(path[1:]))
        return None


def validate_spec(spec: AnyValue) -> None:
    """A JSON runtime spec must at least parse: runc's own error would be far less clear."""
    if not spec.type_url.endswith("opencontainers/runtime-spec/1/Spec"):
        return
    try:
        doc = json.loads(spec.value or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"container.Spec is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("container.Spec must be a JSON object")


def _validate(c: Container) -> None:
    try:
        identifiers.validate(c.id)
    except InvalidArgument as exc:
        raise InvalidArgument(f"container.ID: {exc}") from None
    if any(not k for k in c.extensions):
        raise InvalidArgument("container.Extension keys must not be zero-length")
    labelutil.validate(c.labels, "containers.Labels")
    if not c.runtime_name:
        raise InvalidArgument("container.Runtime.Name must be set")
    if c.spec is None:
        raise InvalidArgument("container.Spec must be set")
    validate_spec(c.spec)
    if c.snapshot_key and not c.snapshotter:
        raise InvalidArgument("container.Snapshotter must be set if container.SnapshotKey is set")


def _dump_extensions(ext: dict[str, AnyValue]) -> str:
    return json.dumps({k: [v.type_url, base64.b64encode(v.value).decode()]
                       for k, v in sorted(ext.items())}, separators=(",", ":"))


def _load_extensions(text: str) -> dict[str, AnyValue]:
    if not text or text == "{}":
        return {}  # the usual case, not worth a JSON parse per row of a listing
    return {k: AnyValue(t, base64.b64decode(v)) for k, (t, v) in json.loads(text).items()}


def _load_labels(text: str) -> dict[str, str]:
    return {} if text == "{}" else labelutil.loads(text)


# Read as plain tuples, in this order: listings of a thousand containers are built
# row by row, and tuple indexing is much cheaper than sqlite3.Row lookups by name.
_COLUMNS = ("id, runtime_name, runtime_options_type, runtime_options, spec_type, spec, labels, "
            "image, snapshotter, snapshot_key, extensions, sandbox, created_at, updated_at")


def _row(row: tuple) -> Container:
    (cid, runtime_name, options_type, options, spec_type, spec, labels, image, snapshotter,
     snapshot_key, extensions, sandbox, created_at, updated_at) = row
    return Container(
        id=cid, runtime_name=runtime_name,
        runtime_options=AnyValue(options_type, bytes(options)) if options is not None else None,
        spec=AnyValue(spec_type, bytes(spec)) if spec is not None else None,
        labels=_load_labels(labels), image=image, snapshotter=snapshotter,
        snapshot_key=snapshot_key, extensions=_load_extensions(extensions), sandbox=sandbox,
        created_at=created_at, updated_at=updated_at)


def _select(conn: sqlite3.Connection, where: str, args: tuple) -> list[tuple]:
    cur = conn.cursor()
    cur.row_factory = None
    return cur.execute(f"SELECT {_COLUMNS} FROM containers WHERE {where}", args).fetchall()


def _write(conn: sqlite3.Connection, ns: str, c: Container, insert: bool) -> None:
    values = {
        "labels": labelutil.dumps({k: v for k, v in c.labels.items() if v}),
        "image": c.image,
        "runtime_name": c.runtime_name,
        "runtime_options_type": c.runtime_options.type_url if c.runtime_options else "",
        "runtime_options": c.runtime_options.value if c.runtime_options else None,
        "spec_type": c.spec.type_url if c.spec else "",
        "spec": c.spec.value if c.spec else None,
        "snapshotter": c.snapshotter,
        "snapshot_key": c.snapshot_key,
        "extensions": _dump_extensions(c.extensions),
        "sandbox": c.sandbox,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
    }
    if insert:
        cols = ["namespace", "id", *values]
        conn.execute(f"INSERT INTO containers({', '.join(cols)}) "
                     f"VALUES ({', '.join('?' * len(cols))})", (ns, c.id, *values.values()))
    else:
        sets = ", ".join(f"{k}=?" for k in values)
        conn.execute(f"UPDATE containers SET {sets} WHERE namespace=? AND id=?",
                     (*values.values(), ns, c.id))


def _get(conn: sqlite3.Connection, ns: str, cid: str) -> Container | None:
    rows = _select(conn, "namespace=? AND id=?", (ns, cid))
    return _row(rows[0]) if rows else None


class ContainerStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, ns: str, cid: str) -> Container:
        found = await self.db.read(lambda conn: _get(conn, ns, cid))
        if found is None:
            raise NotFound(f'container "{cid}" in namespace "{ns}": not found')
        return found

    async def list(self, ns: str, filter_exprs: Sequence[str] = ()) -> list[Container]:
        try:
            matcher = filters.parse_all(list(filter_exprs))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{exc}: invalid argument") from None
        rows = await self.db.read(lambda conn: _select(conn, "namespace=? ORDER BY id", (ns,)))
        found = list(map(_row, rows))
        return [c for c in found if matcher.match(c.field)] if filter_exprs else found

    async def create(self, ns: str, container: Container) -> Container:
        try:
            _validate(container)
        except InvalidArgument as exc:
            raise InvalidArgument(f"create container failed validation: {exc}") from None
        now = time.time_ns()
        created = replace(container, labels={k: v for k, v in container.labels.items() if v},
                          created_at=now, updated_at=now)

        def tx(conn: sqlite3.Connection) -> None:
            ensure(conn, ns)
            try:
                _write(conn, ns, created, insert=True)
            except sqlite3.IntegrityError:
                raise AlreadyExists(f'container "{container.id}": already exists') from None

        await self.db.write(tx)
        return created

    async def update(self, ns: str, container: Container,
                     paths: Sequence[str] = ()) -> Container:
        if not container.id:
            raise InvalidArgument("must specify a container id")

        def tx(conn: sqlite3.Connection) -> Container:
            current = _get(conn, ns, container.id)
            if current is None:
                raise NotFound(f'container "{container.id}": not found')
            fieldpaths = list(paths)
            if not fieldpaths:
                # A full replace may only touch the mutable fields; the others must match.
                fieldpaths = ["labels", "spec", "extensions", "image", "snapshotkey"]
                if current.snapshotter != container.snapshotter:
                    raise InvalidArgument("container.Snapshotter field is immutable")
                if current.runtime_name != container.runtime_name:
                    raise InvalidArgument("container.Runtime.Name field is immutable")
            updated = replace(current, labels=dict(current.labels),
                              extensions=dict(current.extensions))
            for path in fieldpaths:
                if path.startswith("labels."):
                    key = path[len("labels."):]
                    updated.labels[key] = container.labels.get(key, "")
                elif path.startswith("extensions."):
                    key = path[len("extensions."):]
                    if key in container.extensions:
                        updated.extensions[key] = container.extensions[key]
                    else:
                        updated.extensions.pop(key, None)
                elif path == "labels":
                    updated.labels = dict(container.labels)
                elif path == "spec":
                    updated.spec = container.spec
                elif path == "extensions":
                    updated.extensions = dict(container.extensions)
                elif path == "image":
                    updated.image = container.image
                elif path == "snapshotkey":
                    updated.snapshot_key = container.snapshot_key
                else:
                    raise InvalidArgument(f'cannot update "{path}" field on "{container.id}"')
            updated.labels = {k: v for k, v in updated.labels.items() if v}
            try:
                _validate(updated)
            except InvalidArgument as exc:
                raise InvalidArgument(f"update failed validation: {exc}") from None
            updated.updated_at = time.time_ns()
            _write(conn, ns, updated, insert=False)
            return updated

        return await self.db.write(tx)

    async def delete(self, ns: str, cid: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute("DELETE FROM containers WHERE namespace=? AND id=?", (ns, cid))
            if cur.rowcount == 0:
                raise NotFound(f'container "{cid}": not found')

        await self.db.write(tx)
