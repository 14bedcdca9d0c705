"""containerd's ttrpc protocol: a small request/response RPC over a stream socket.

Two flavours share the wire code (``framing``, ``codec``):

- ``ctrd.ttrpc.aio``: asyncio ``Client`` and ``Server`` for the daemon.
- ``ctrd.ttrpc.blocking``: thread-based ``Client`` and ``Server`` for the shim, which
  must start fast and stay small, so it never imports asyncio.

Importing this package itself pulls in neither flavour.
"""
