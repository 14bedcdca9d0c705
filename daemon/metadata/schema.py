"""The metadata schema, as a list of forward migrations.

Migration N (0-based) takes a database from ``user_version`` N to N+1. Never edit a
migration that has shipped; append a new one. Like containerd's bolt layout, every
record lives under a namespace; labels are JSON objects; times are integer
nanoseconds since the epoch so that protobuf Timestamps round-trip exactly.
"""

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE namespaces (
        name TEXT PRIMARY KEY,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL
    );

    CREATE TABLE images (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        name TEXT NOT NULL,
        media_type TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        annotations TEXT NOT NULL DEFAULT '{}',
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    );

    CREATE TABLE containers (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        id TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        image TEXT NOT NULL DEFAULT '',
        runtime_name TEXT NOT NULL,
        runtime_options_type TEXT NOT NULL DEFAULT '',
        runtime_options BLOB,
        spec_type TEXT NOT NULL DEFAULT '',
        spec BLOB,
        snapshotter TEXT NOT NULL DEFAULT '',
        snapshot_key TEXT NOT NULL DEFAULT '',
        -- map of name -> Any, as JSON {name: [type_url, base64 value]}
        extensions TEXT NOT NULL DEFAULT '{}',
        sandbox TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    );

    -- Blobs live once on disk, shared; each namespace that has one records it here.
    CREATE TABLE content (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, digest)
    );
    CREATE INDEX content_by_digest ON content(digest);

    -- Open ingests (Write refs) per namespace; the data lives in the content store.
    CREATE TABLE ingests (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        ref TEXT NOT NULL,
        -- the content store's own key for the ingest (namespace-qualified ref)
        store_ref TEXT NOT NULL,
        expected TEXT NOT NULL DEFAULT '',
        expires_at INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (namespace, ref)
    );

    CREATE TABLE leases (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        id TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    );

    -- type is "content", "ingests" or "snapshots/<snapshotter>", as containerd names them.
    CREATE TABLE lease_resources (
        namespace TEXT NOT NULL,
        lease TEXT NOT NULL,
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        PRIMARY KEY (namespace, lease, type, id),
        FOREIGN KEY (namespace, lease) REFERENCES leases(namespace, id) ON DELETE CASCADE
    );

    -- Namespaced view of the snapshotters; the backend keeps its own records under
    -- backend_key, which is unique across namespaces.
    CREATE TABLE snapshots (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        snapshotter TEXT NOT NULL,
        key TEXT NOT NULL,
        backend_key TEXT NOT NULL,
        parent TEXT NOT NULL DEFAULT '',
        kind INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, snapshotter, key),
        UNIQUE (snapshotter, backend_key)
    );
    CREATE INDEX snapshots_by_parent ON snapshots(namespace, snapshotter, parent)
    """,
]
