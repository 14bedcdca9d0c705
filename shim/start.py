"""The ``start`` action: create the shim's socket, fork the serving shim, print the address.

containerd runs ``<shim> ... start`` in the bundle directory, reads the address
from its stdout and then talks ttrpc to it; stdin may carry the runtime options
(an Any), of which only the shim's own cgroup matters here.
"""
from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat

from ctrd import errors

SOCKET_DIR = "/run/containerd/s"
SOCKET_PATH_LIMIT = 106
GROUP_LABELS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")


def socket_address(containerd_address: str, namespace: str, grouping: str) -> str:
    digest = hashlib.sha256(os.path.join(containerd_address, namespace, grouping).encode())
    return f"unix://{SOCKET_DIR}/{digest.hexdigest()}"


def grouping_id(bundle: str, id: str) -> str:
    """Containers annotated with a group share one shim."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            data = f.read()
    except OSError:
        return id
    # Encoders write these ASCII keys verbatim; without them there is nothing to
    # decode, and ``start`` is spared importing json (and re) for most containers.
    if not any(label.encode() in data for label in GROUP_LABELS):
        return id
    import json

    try:
        annotations = json.loads(data).get("annotations") or {}
    except ValueError:
        return id
    for label in GROUP_LABELS:
        if annotations.get(label):
            return str(annotations[label])
    return id


def _path(address: str) -> str:
    return address[len("unix://"):]


def _listen(address: str) -> socket.socket:
    path = _path(address)
    if len(path) > SOCKET_PATH_LIMIT:
        raise errors.InvalidArgument(f"{path}: unix socket path too long")
    return listen_private(path)


def listen_private(path: str) -> socket.socket:
    """A listening unix socket at ``path`` only its owner may connect to, in a
    directory created private if missing."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _can_connect(address: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.1)
    try:
        s.connect(_path(address))
        return True
    except OSError:
        return False
    finally:
        s.close()


def write_address(bundle: str, address: str) -> None:
    tmp = os.path.join(bundle, ".address")
    with open(tmp, "w") as f:
        f.write(address)
    os.rename(tmp, os.path.join(bundle, "address"))


def shim_cgroup(options: bytes) -> str:
    if not options:
        return ""
    from google.protobuf import any_pb2

    from ctrd.api.containerd.runc.options import oci_pb2

    any_msg = any_pb2.Any.FromString(options)
    opts = oci_pb2.Options()
    if any_msg.type_url.rsplit("/", 1)[-1] != opts.DESCRIPTOR.full_name:
        return ""
    opts.ParseFromString(any_msg.value)
    return opts.shim_cgroup


def join_cgroup(cgroup: str, pid: int) -> None:
    root = "/sys/fs/cgroup"
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        targets = [os.path.join(root, cgroup.lstrip("/"))]
    else:
        targets = [os.path.join(root, c, cgroup.lstrip("/")) for c in os.listdir(root)
                   if os.path.isdir(os.path.join(root, c)) and not os.path.islink(os.path.join(root, c))]
    for target in targets:
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "cgroup.procs"), "w") as f:
            f.write(str(pid))


def adjust_oom_score(pid: int, daemon_pid: int) -> None:
    """One above the daemon's score, so the kernel picks the shim before the daemon."""
    try:
        with open(f"/proc/{daemon_pid}/oom_score_adj") as f:
            score = int(f.read().strip())
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(score + 1, 1000)))
    except (OSError, ValueError):
        pass


def open_listener(bundle: str, id: str, namespace: str,
                  containerd_address: str) -> tuple[socket.socket | None, str]:
    """The listening socket for a new shim and its address; no socket when a live
    shim of the same group already serves that address. A socket left by a dead
    shim is replaced."""
    address = socket_address(containerd_address, namespace, grouping_id(bundle, id))
    try:
        return _listen(address), address
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    if _can_connect(address):
        return None, address
    if stat.S_ISSOCK(os.lstat(_path(address)).st_mode):
        os.unlink(_path(address))
    return _listen(address), address


def remove_socket(address: str) -> None:
    try:
        os.unlink(_path(address))
    except OSError:
        pass


def start(namespace: str, id: str, containerd_address: str, ttrpc_address: str,
          debug: bool) -> int:
    bundle = os.getcwd()
    listener, address = open_listener(bundle, id, namespace, containerd_address)
    if listener is None:  # a shim for this group already runs
        write_address(bundle, address)
        os.write(1, address.encode())
        return 0
    try:
        write_address(bundle, address)
        stdin = _read_all(0)
        pid = os.fork()
        if pid == 0:
            _become_daemon()
            code = 1
            try:
                from ctrd.shim.serve import serve

                code = serve(listener, namespace, bundle, ttrpc_address, address, debug)
            finally:
                os._exit(code)
        listener.close()
        try:
            cgroup = shim_cgroup(stdin)
            if cgroup:
                join_cgroup(cgroup, pid)
            adjust_oom_score(pid, os.getppid())
        except BaseException:
            os.kill(pid, 9)
            raise
    except BaseException:
        remove_socket(address)
        raise
    os.write(1, address.encode())
    return 0


def _read_all(fd: int) -> bytes:
    if os.isatty(fd):
        return b""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _become_daemon() -> None:
    """Detach from the start command: own session, and none of its stdio, which
    containerd reads until every writer is gone."""
    os.setsid()
    null_stdio()


def null_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
