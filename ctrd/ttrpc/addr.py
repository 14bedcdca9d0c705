"""Socket addresses as containerd spells them: ``unix:///path``, a bare path, or an
abstract name (``\\0name`` or ``@name``)."""
from __future__ import annotations

import os
import socket
import struct


def socket_path(address: str) -> str:
    if address.startswith("unix://"):
        return address[len("unix://"):]
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


def peer_is_same_user(sock: socket.socket) -> bool:
    """Whether the process at the other end runs with our uid and gid (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    return uid == os.getuid() and gid == os.getgid()
