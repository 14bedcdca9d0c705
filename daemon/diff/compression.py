"""Layer (de)compression for the differ: detection, and decompression off the hot thread.

Decompression runs in its own thread and feeds the extracting thread through a pipe,
so that inflating the next megabyte overlaps with writing files from the previous
one (isal, zstandard, hashlib and pipe writes all release the GIL). The same thread
hashes the uncompressed stream: that digest is the layer's diff ID.
"""
from __future__ import annotations

import enum
import hashlib
import os
import threading
from typing import BinaryIO

import zstandard

from ctrd.errors import DataLoss, InvalidArgument, Unimplemented
from ctrd.oci import mediatypes

try:
    from isal import igzip as gzip_impl
    from isal import isal_zlib as zlib_impl
except ImportError:  # pragma: no cover - isal is a declared dependency; zlib still works
    import gzip as gzip_impl  # type: ignore[no-redef]
    import zlib as zlib_impl  # type: ignore[no-redef]

CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Compression(enum.Enum):
    NONE = ""
    GZIP = "gzip"
    ZSTD = "zstd"


def is_compressed(media_type: str) -> bool:
    """Whether a layer of this media type is compressed; unknown types are refused.

    As in containerd, the media type only says *whether*; the stream's magic bytes say
    *how*, since Docker types do not always tell the truth about the algorithm.
    """
    kind = mediatypes.layer_compression(media_type)
    if kind is None:
        raise Unimplemented(f"unsupported diff media type: {media_type}: not implemented")
    return kind != ""


def detect(head: bytes) -> Compression:
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    return Compression.NONE


def _open(raw: BinaryIO, compressed: bool) -> BinaryIO:
    if not compressed:
        return raw
    head = raw.read(4)
    raw.seek(0)
    kind = detect(head)
    if kind is Compression.GZIP:
        return gzip_impl.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind is Compression.ZSTD:
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    # containerd passes a stream without known magic through unchanged.
    return raw


class DecompressingPipe:
    """The uncompressed bytes of a blob file, readable from ``reader`` while a thread inflates.

    After the consumer is done, ``finish()`` drains what it did not read (so the digest
    covers the whole stream, tar padding included) and returns the digest; any
    decompression error is raised from there, as DataLoss.
    """

    def __init__(self, path: str, compressed: bool) -> None:
        self._raw = open(path, "rb")
        try:
            self._src = _open(self._raw, compressed)
        except Exception:
            self._raw.close()
            raise
        rfd, self._wfd = os.pipe()
        # A bigger pipe means fewer context switches between the two threads.
        try:
            import fcntl
            fcntl.fcntl(self._wfd, 1031, CHUNK)  # F_SETPIPE_SZ
        except OSError:
            pass
        self.reader: BinaryIO = os.fdopen(rfd, "rb", buffering=CHUNK)
        self._hash = hashlib.sha256()
        self.size = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pump, name="layer-inflate", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            read, update, write, wfd = self._src.read, self._hash.update, os.write, self._wfd
            while chunk := read(CHUNK):
                update(chunk)
                self.size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[write(wfd, view):]
        except BrokenPipeError:
            pass  # the consumer stopped early (it failed); its error is the one to report
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            self._error = exc
        finally:
            os.close(self._wfd)

    def error(self) -> BaseException | None:
        """The decompression error, once the pump has stopped (call after EOF/failure)."""
        self._thread.join()
        if self._error is None:
            return None
        if isinstance(self._error, (EOFError, OSError, zstandard.ZstdError, zlib_impl.error)):
            return DataLoss(f"corrupt or truncated compressed layer: {self._error}")
        return self._error

    def finish(self) -> str:
        while self.reader.read(CHUNK):
            pass
        err = self.error()
        if err is not None:
            raise err
        return "sha256:" + self._hash.hexdigest()

    def close(self) -> None:
        self.reader.close()  # unblocks the pump with EPIPE if it still writes
        self._thread.join()
        self._raw.close()


class CompressingWriter:
    """A file-like sink that hashes what it gets, compresses it, and hashes that too."""

    def __init__(self, out: BinaryIO, compression: Compression) -> None:
        self._out = out
        self.uncompressed = hashlib.sha256()
        self.compressed = hashlib.sha256()
        self.size = 0
        if compression is Compression.GZIP:
            self._enc = zlib_impl.compressobj(wbits=31)  # 31: gzip framing
            self._flush = self._enc.flush
            self._compress = self._enc.compress
        elif compression is Compression.ZSTD:
            enc = zstandard.ZstdCompressor().compressobj()
            self._compress, self._flush = enc.compress, enc.flush
        elif compression is Compression.NONE:
            self._compress, self._flush = (lambda b: bytes(b)), (lambda: b"")
        else:  # pragma: no cover
            raise InvalidArgument(f"unknown compression {compression}")

    def _emit(self, data: bytes) -> None:
        if data:
            self.compressed.update(data)
            self.size += len(data)
            self._out.write(data)

    def write(self, data: bytes) -> int:
        self.uncompressed.update(data)
        self._emit(self._compress(data))
        return len(data)

    def close(self) -> None:
        self._emit(self._flush())
