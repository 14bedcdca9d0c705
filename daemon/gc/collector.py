"""Mark and sweep over the metadata, with containerd's rules for what stays alive.

Roots are: images (their target and the objects their labels name), containers (their
snapshot and label references), leases that have not expired (everything attached to
them), ingests whose expiry is still ahead, and content or snapshots labelled
``containerd.io/gc.root``. From the roots, references are followed: labels
``containerd.io/gc.ref.content[.<x>|/<x>]`` name content in the same namespace,
``containerd.io/gc.ref.snapshot.<snapshotter>[/<x>]`` name snapshots; a snapshot holds
its parent; an ingest holds the digest it expects. A lease labelled
``containerd.io/gc.flat`` holds only what is attached to it (and snapshot parents),
without following labels.

The mark and the removal of unreachable rows happen in one write transaction, so the
metadata is never seen half-collected. Files on disk are removed afterwards, and only
when no row (of any namespace) refers to them: a crash between the two steps leaves
orphan files that the next collection removes, never a row without its file.
"""
from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ..metadata import labels as labelutil
from ..metadata.leases import FLAT_LABEL, expired

ROOT_LABEL = "containerd.io/gc.root"
CONTENT_REF = "containerd.io/gc.ref.content"
SNAPSHOT_REF = "containerd.io/gc.ref.snapshot."

CONTENT = "content"
CONTENT_FLAT = "content-flat"
SNAPSHOT = "snapshot"
SNAPSHOT_FLAT = "snapshot-flat"
INGEST = "ingest"

# (kind, namespace, key); snapshot keys are "<snapshotter>/<key>".
Node = tuple[str, str, str]


@dataclass
class Report:
    """What one collection removed."""

    content: list[tuple[str, str]] = field(default_factory=list)  # (namespace, digest)
    ingests: list[tuple[str, str]] = field(default_factory=list)  # (namespace, ref)
    snapshots: list[tuple[str, str, str]] = field(default_factory=list)  # (ns, snapshotter, key)
    leases: list[tuple[str, str]] = field(default_factory=list)  # (namespace, id)
    blobs: list[str] = field(default_factory=list)  # digests removed from disk
    backend_ingests: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def snapshotters(self) -> set[str]:
        return {s for _, s, _ in self.snapshots}


def label_refs(namespace: str, labels: Mapping[str, str]) -> Iterator[Node]:
    """The nodes an object's labels point at."""
    for key, value in labels.items():
        if not value:
            continue
        if key == CONTENT_REF or (key.startswith(CONTENT_REF)
                                  and key[len(CONTENT_REF)] in "./"):
            yield CONTENT, namespace, value
        elif key.startswith(SNAPSHOT_REF):
            snapshotter = key[len(SNAPSHOT_REF):].split("/", 1)[0]
            if snapshotter:
                yield SNAPSHOT, namespace, f"{snapshotter}/{value}"


def _roots(conn: sqlite3.Connection, now: int) -> Iterator[Node]:
    for row in conn.execute("SELECT namespace, id, labels FROM leases"):
        labels = labelutil.loads(row["labels"])
        if expired(labels, now):
            continue
        flat = FLAT_LABEL in labels
        for res in conn.execute("SELECT type, id FROM lease_resources WHERE namespace=? "
                                "AND lease=?", (row["namespace"], row["id"])):
            kind, _, snapshotter = res["type"].partition("/")
            if kind == "content":
                yield CONTENT_FLAT if flat else CONTENT, row["namespace"], res["id"]
            elif kind == "ingests":
                yield INGEST, row["namespace"], res["id"]
            elif kind == "snapshots":
                yield (SNAPSHOT_FLAT if flat else SNAPSHOT, row["namespace"],
                       f"{snapshotter}/{res['id']}")
    for row in conn.execute("SELECT namespace, digest, labels FROM images"):
        yield CONTENT, row["namespace"], row["digest"]
        yield from label_refs(row["namespace"], labelutil.loads(row["labels"]))
    for row in conn.execute("SELECT namespace, ref FROM ingests WHERE expires_at > ?", (now,)):
        yield INGEST, row["namespace"], row["ref"]
    for row in conn.execute("SELECT namespace, digest, labels FROM content"):
        if ROOT_LABEL in labelutil.loads(row["labels"]):
            yield CONTENT, row["namespace"], row["digest"]
    for row in conn.execute("SELECT namespace, labels, snapshotter, snapshot_key FROM containers"):
        if row["snapshotter"]:
            yield SNAPSHOT, row["namespace"], f"{row['snapshotter']}/{row['snapshot_key']}"
        yield from label_refs(row["namespace"], labelutil.loads(row["labels"]))
    for row in conn.execute("SELECT namespace, snapshotter, key, labels FROM snapshots"):
        if ROOT_LABEL in labelutil.loads(row["labels"]):
            yield SNAPSHOT, row["namespace"], f"{row['snapshotter']}/{row['key']}"


def _references(conn: sqlite3.Connection, node: Node) -> Iterator[Node]:
    kind, namespace, key = node
    if kind == CONTENT:
        row = conn.execute("SELECT labels FROM content WHERE namespace=? AND digest=?",
                           (namespace, key)).fetchone()
        if row is not None:
            yield from label_refs(namespace, labelutil.loads(row["labels"]))
    elif kind in (SNAPSHOT, SNAPSHOT_FLAT):
        snapshotter, _, name = key.partition("/")
        row = conn.execute("SELECT parent, labels FROM snapshots WHERE namespace=? AND "
                           "snapshotter=? AND key=?", (namespace, snapshotter, name)).fetchone()
        if row is None:
            return
        if row["parent"]:
            yield kind, namespace, f"{snapshotter}/{row['parent']}"
        if kind == SNAPSHOT:
            yield from label_refs(namespace, labelutil.loads(row["labels"]))
    elif kind == INGEST:
        row = conn.execute("SELECT expected FROM ingests WHERE namespace=? AND ref=?",
                           (namespace, key)).fetchone()
        if row is not None and row["expected"]:
            yield CONTENT, namespace, row["expected"]


def mark(conn: sqlite3.Connection, now: int) -> set[Node]:
    """Every node reachable from the roots; flat kinds are folded into their plain kind."""
    seen: set[Node] = set()
    queue = deque(_roots(conn, now))
    while queue:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        queue.extend(n for n in _references(conn, node) if n not in seen)
    return {({CONTENT_FLAT: CONTENT, SNAPSHOT_FLAT: SNAPSHOT}.get(k, k), ns, key)
            for k, ns, key in seen}


def sweep_rows(conn: sqlite3.Connection, now: int | None = None) -> Report:
    """Mark, then delete every unreachable row (run inside one write transaction)."""
    now = time.time_ns() if now is None else now
    live = mark(conn, now)
    report = Report()
    for row in conn.execute("SELECT namespace, id, labels FROM leases").fetchall():
        if expired(labelutil.loads(row["labels"]), now):
            report.leases.append((row["namespace"], row["id"]))
    for ns, lease_id in report.leases:
        conn.execute("DELETE FROM lease_resources WHERE namespace=? AND lease=?", (ns, lease_id))
        conn.execute("DELETE FROM leases WHERE namespace=? AND id=?", (ns, lease_id))
    for row in conn.execute("SELECT namespace, digest FROM content").fetchall():
        if (CONTENT, row["namespace"], row["digest"]) not in live:
            report.content.append((row["namespace"], row["digest"]))
    conn.executemany("DELETE FROM content WHERE namespace=? AND digest=?", report.content)
    for row in conn.execute("SELECT namespace, ref FROM ingests").fetchall():
        if (INGEST, row["namespace"], row["ref"]) not in live:
            report.ingests.append((row["namespace"], row["ref"]))
    conn.executemany("DELETE FROM ingests WHERE namespace=? AND ref=?", report.ingests)
    for row in conn.execute("SELECT namespace, snapshotter, key FROM snapshots").fetchall():
        node = (SNAPSHOT, row["namespace"], f"{row['snapshotter']}/{row['key']}")
        if node not in live:
            report.snapshots.append((row["namespace"], row["snapshotter"], row["key"]))
    conn.executemany("DELETE FROM snapshots WHERE namespace=? AND snapshotter=? AND key=?",
                     report.snapshots)
    return report


def referenced_blobs(conn: sqlite3.Connection) -> tuple[set[str], set[str]]:
    """(digests some row needs on disk, backend ingest keys some row needs)."""
    digests = {r[0] for r in conn.execute("SELECT DISTINCT digest FROM content")}
    digests |= {r[0] for r in conn.execute("SELECT DISTINCT expected FROM ingests "
                                           "WHERE expected != ''")}
    store_refs = {r[0] for r in conn.execute("SELECT store_ref FROM ingests")}
    return digests, store_refs
