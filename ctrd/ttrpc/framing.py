"""The ttrpc frame: a 10-byte header followed by a protobuf payload.

Header layout (big endian): payload length (uint32), stream id (uint32), message
type (uint8), flags (uint8). Only unary calls exist here: one request frame from the
client, one response frame back, both on the same odd stream id.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_MESSAGE = 4 << 20  # peers refuse payloads larger than 4 MiB

TYPE_REQUEST = 1
TYPE_RESPONSE = 2


@dataclass(slots=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    # None when the peer announced a payload above MAX_MESSAGE: its bytes were skipped,
    # and the stream must be answered (or failed) with RESOURCE_EXHAUSTED.
    payload: bytes | None
    length: int


def encode(stream_id: int, type_: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(payload), stream_id, type_, flags) + payload


class Decoder:
    """Incremental frame parser: feed bytes as they arrive, get whole frames back.

    Oversized frames are not buffered; their bytes are dropped as they stream past,
    so a hostile peer cannot make us hold more than one legal frame in memory.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized payload still to drop

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        while True:
            if self._skip:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip:
                    return frames
            if len(buf) < HEADER_SIZE:
                return frames
            length, stream_id, type_, flags = HEADER.unpack_from(buf)
            if length > MAX_MESSAGE:
                del buf[:HEADER_SIZE]
                self._skip = length
                frames.append(Frame(stream_id, type_, flags, None, length))
                continue
            end = HEADER_SIZE + length
            if len(buf) < end:
                return frames
            payload = bytes(buf[HEADER_SIZE:end])
            del buf[:end]
            frames.append(Frame(stream_id, type_, flags, payload, length))

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (a clean EOF has none)."""
        return len(self._buf) + self._skip
