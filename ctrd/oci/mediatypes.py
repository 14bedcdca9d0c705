"""Media types of OCI and Docker schema 2 images, and questions asked about them."""
from __future__ import annotations

# OCI image-spec.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDISTRIBUTABLE_GZIP = OCI_LAYER_NONDISTRIBUTABLE + "+gzip"
OCI_LAYER_NONDISTRIBUTABLE_ZSTD = OCI_LAYER_NONDISTRIBUTABLE + "+zstd"
OCI_EMPTY_JSON = "application/vnd.oci.empty.v1+json"
OCI_LAYOUT_VERSION = "1.0.0"

# Docker image manifest v2, schema 2 (and the schema 1 type, only to recognise it).
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = DOCKER_LAYER + ".gzip"
DOCKER_LAYER_ZSTD = DOCKER_LAYER + ".zstd"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_LAYER_FOREIGN_GZIP = DOCKER_LAYER_FOREIGN + ".gzip"

# Annotations that name an image inside an index or layout.
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"

INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIGS = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYERS = frozenset({
    OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD,
    OCI_LAYER_NONDISTRIBUTABLE, OCI_LAYER_NONDISTRIBUTABLE_GZIP, OCI_LAYER_NONDISTRIBUTABLE_ZSTD,
    DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_LAYER_ZSTD,
    DOCKER_LAYER_FOREIGN, DOCKER_LAYER_FOREIGN_GZIP,
})
NONDISTRIBUTABLE = frozenset({
    OCI_LAYER_NONDISTRIBUTABLE, OCI_LAYER_NONDISTRIBUTABLE_GZIP, OCI_LAYER_NONDISTRIBUTABLE_ZSTD,
    DOCKER_LAYER_FOREIGN, DOCKER_LAYER_FOREIGN_GZIP,
})

_COMPRESSION = {
    OCI_LAYER: "", OCI_LAYER_NONDISTRIBUTABLE: "", DOCKER_LAYER: "", DOCKER_LAYER_FOREIGN: "",
    OCI_LAYER_GZIP: "gzip", OCI_LAYER_NONDISTRIBUTABLE_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip", DOCKER_LAYER_FOREIGN_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd", OCI_LAYER_NONDISTRIBUTABLE_ZSTD: "zstd", DOCKER_LAYER_ZSTD: "zstd",
}

# Layer media types by (docker?, nondistributable?, compression).
_LAYER_TYPES = {
    (False, False, ""): OCI_LAYER,
    (False, False, "gzip"): OCI_LAYER_GZIP,
    (False, False, "zstd"): OCI_LAYER_ZSTD,
    (False, True, ""): OCI_LAYER_NONDISTRIBUTABLE,
    (False, True, "gzip"): OCI_LAYER_NONDISTRIBUTABLE_GZIP,
    (False, True, "zstd"): OCI_LAYER_NONDISTRIBUTABLE_ZSTD,
    (True, False, ""): DOCKER_LAYER,
    (True, False, "gzip"): DOCKER_LAYER_GZIP,
    (True, False, "zstd"): DOCKER_LAYER_ZSTD,
    (True, True, ""): DOCKER_LAYER_FOREIGN,
    (True, True, "gzip"): DOCKER_LAYER_FOREIGN_GZIP,
}


def base(media_type: str) -> str:
    """The media type without parameters (``; charset=...``), lower-cased."""
    return media_type.split(";", 1)[0].strip().lower()


def is_index(media_type: str) -> bool:
    return base(media_type) in INDEXES


def is_manifest(media_type: str) -> bool:
    return base(media_type) in MANIFESTS


def is_config(media_type: str) -> bool:
    return base(media_type) in CONFIGS


def is_layer(media_type: str) -> bool:
    return base(media_type) in LAYERS


def is_nondistributable(media_type: str) -> bool:
    return base(media_type) in NONDISTRIBUTABLE


def layer_compression(media_type: str) -> str | None:
    """"gzip", "zstd" or "" (uncompressed) for a known layer type, None for any other."""
    return _COMPRESSION.get(base(media_type))


def layer_type(compression: str, *, docker: bool = False, nondistributable: bool = False) -> str:
    """The layer media type for a compression ("", "gzip", "zstd") and flavour.

    Raises ValueError for combinations no spec defines (foreign zstd Docker layers).
    """
    try:
        return _LAYER_TYPES[(docker, nondistributable, compression)]
    except KeyError:
        raise ValueError(
            f"no layer media type for compression {compression!r}"
            f" (docker={docker}, nondistributable={nondistributable})"
        ) from None
