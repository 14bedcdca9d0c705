"""A small blocking WebSocket client speaking Kubernetes' channel subprotocols, for
tests of the CRI streaming server without a kubelet."""
from __future__ import annotations

import base64
import os
import socket
import struct
from urllib.parse import urlsplit


class ChannelClient:
    def __init__(self, url: str, protocol: str = "v5.channel.k8s.io",
                 timeout: float = 10) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                   "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n")
        self.sock.sendall(request.encode())
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.head = head.decode("latin-1")
        self.body = b""
        if self.status != 101:
            self.body = self.buffer + self._rest()

    def _rest(self) -> bytes:
        chunks = []
        while chunk := self.sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send_frame(self, opcode: int, payload: bytes, final: bool = True) -> None:
        mask = os.urandom(4)
        length = len(payload)
        first = (0x80 if final else 0) | opcode
        if length < 126:
            header = struct.pack("!BB", first, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", first, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, channel: int, data: bytes) -> None:
        self.send_frame(0x2, bytes([channel]) + data)

    def recv(self) -> tuple[int, bytes] | None:
        """The next data message as (channel, payload); None once the server closed."""
        while True:
            try:
                first, second = self._exact(2)
            except ConnectionError:
                return None
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._exact(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._exact(8))
            payload = self._exact(length)
            opcode = first & 0x0F
            if opcode == 0x8:
                return None
            if opcode in (0x1, 0x2) and payload:
                return payload[0], payload[1:]

    def collect(self) -> dict[int, bytes]:
        """Every channel's data until the server closes."""
        out: dict[int, bytes] = {}
        while (message := self.recv()) is not None:
            out[message[0]] = out.get(message[0], b"") + message[1]
        return out

    def close(self) -> None:
        self.sock.close()
