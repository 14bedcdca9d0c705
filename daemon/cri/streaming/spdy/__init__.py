"""SPDY/3.1 as Kubernetes speaks it on CRI's streaming URLs.

After the HTTP upgrade, a Kubernetes client (kubectl up to 1.29 for exec, the API
server, client-go) opens one SPDY stream per channel and names it with a
``streamtype`` header; the server answers each with a SYN_REPLY. The layers, one
module each:

* :mod:`.frames`: framing: :class:`Framer` (the frames carrying zlib-compressed header
  blocks, one compression context per direction) and the ``encode_*`` functions for
  the others; the tests' client uses them too;
* :mod:`.session`: :class:`Session`, the server side of one connection (stream table,
  PING answers, flow control, orderly or hostile shutdown);
* the two protocols kubelet serves over it: :func:`serve_command` in
  :mod:`.remotecommand` (exec and attach) and :func:`serve_portforward` in
  :mod:`.portforward`, with the stream names they share in :mod:`.streamtypes`.

This package is the public face: callers import from it, never from its modules.
"""
from __future__ import annotations

from .frames import (
    CANCEL,
    DICTIONARY,
    FLAG_FIN,
    FLAG_UNIDIRECTIONAL,
    FLOW_CONTROL_ERROR,
    FRAME_TOO_LARGE,
    GOAWAY,
    GOAWAY_INTERNAL_ERROR,
    GOAWAY_OK,
    GOAWAY_PROTOCOL_ERROR,
    HEADERS,
    INITIAL_WINDOW,
    INTERNAL_ERROR,
    INVALID_STREAM,
    MAX_CONTROL_FRAME,
    MAX_DATA_FRAME,
    MAX_HEADER_BLOCK,
    MAX_WINDOW,
    PING,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SYN_REPLY,
    SYN_STREAM,
    UNSUPPORTED_VERSION,
    VERSION,
    WINDOW_UPDATE,
    DataFrame,
    Frame,
    Framer,
    GoAway,
    Headers,
    HeadersFrame,
    Ping,
    ProtocolError,
    RstStream,
    Settings,
    SynReply,
    SynStream,
    UnknownControl,
    WindowUpdate,
    encode_data,
    encode_goaway,
    encode_header_block,
    encode_ping,
    encode_rst_stream,
    encode_settings,
    encode_window_update,
    parse_header_block,
)
from .portforward import serve_portforward
from .remotecommand import CLOSE_LINGER, expected_channels, serve_command
from .session import INBOUND_BUFFER, MAX_STREAMS, SEND_CHUNK, STREAM_TIMEOUT, Session, Stream
from .streamtypes import (
    DATA,
    ERROR,
    PORT,
    REQUEST_ID,
    RESIZE,
    STDERR,
    STDIN,
    STDOUT,
    STREAM_TYPE,
)

__all__ = [
    "CANCEL", "CLOSE_LINGER", "DATA", "DICTIONARY", "ERROR", "FLAG_FIN", "FLAG_UNIDIRECTIONAL",
    "FLOW_CONTROL_ERROR", "FRAME_TOO_LARGE", "GOAWAY", "GOAWAY_INTERNAL_ERROR", "GOAWAY_OK",
    "GOAWAY_PROTOCOL_ERROR", "HEADERS", "INBOUND_BUFFER", "INITIAL_WINDOW", "INTERNAL_ERROR",
    "INVALID_STREAM", "MAX_CONTROL_FRAME", "MAX_DATA_FRAME", "MAX_HEADER_BLOCK", "MAX_STREAMS",
    "MAX_WINDOW", "PING", "PORT", "PROTOCOL_ERROR", "REFUSED_STREAM", "REQUEST_ID", "RESIZE",
    "RST_STREAM", "SEND_CHUNK", "SETTINGS", "SETTINGS_INITIAL_WINDOW_SIZE", "STDERR", "STDIN",
    "STDOUT", "STREAM_TIMEOUT", "STREAM_TYPE", "SYN_REPLY", "SYN_STREAM", "UNSUPPORTED_VERSION",
    "VERSION", "WINDOW_UPDATE", "DataFrame", "Frame", "Framer", "GoAway", "Headers",
    "HeadersFrame", "Ping", "ProtocolError", "RstStream", "Session", "Settings", "Stream",
    "SynReply", "SynStream", "UnknownControl", "WindowUpdate", "encode_data", "encode_goaway",
    "encode_header_block", "encode_ping", "encode_rst_stream", "encode_settings",
    "encode_window_update", "expected_channels", "parse_header_block", "serve_command",
    "serve_portforward",
]
