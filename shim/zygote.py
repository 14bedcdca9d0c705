"""A warm shim factory: fork serving shims from a process that has imported them.

``containerd-shim-ctrd-v2 zygote -socket PATH -state DIR`` imports everything a
serving shim needs once, then waits on a unix socket. Each request (one JSON line:
namespace, id, bundle, daemon address, events address, debug, environment, runtime
options) makes it fork a shim that serves exactly as one launched by ``start``
would: same socket address, ``address`` file, cgroup, OOM score and session. The
answer (one JSON line) is the shim's address, or an error with its status code.

Why: a shim re-executed per container pays the interpreter and its imports (about
100 ms before it answers, 11 MiB of private memory). A forked shim answers within a
few milliseconds, and most of its pages stay shared with the zygote: only what it
writes is copied (``gc.freeze`` keeps the collector from writing to the imported
objects, and on CPython 3.12 immortal.py keeps reference counting from doing so).

A shim is forked twice, the middle process exiting at once, so that it belongs to
neither the zygote nor the daemon and outlives both. The zygote is single threaded
when it forks (warmup.py joins its threads first), so a forked child holds no lock
another thread owned; the child closes
what the zygote had open and starts its threads afresh. ``random`` re-seeds itself
in a forked child (it registers an at-fork hook), as does tempfile's name sequence.

The zygote only accepts peers of its own uid and gid, only bundles at
``<state>/<namespace>/<id>``, and exits when its parent does.
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import gc
import json
import os
import selectors
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ctrd import errors, identifiers
from ctrd.shim import immortal
from ctrd.shim import start as shim_start
from ctrd.shim import warmup
from ctrd.shim.log import Logger
from ctrd.ttrpc.addr import peer_is_same_user

NAME = "containerd-shim-ctrd-v2"
MAX_REQUEST = 1 << 20
READY_TIMEOUT = 10.0  # for a forked shim to report that it is set up
PARENT_POLL = 1.0  # how often the zygote looks whether its parent is still there
REPLY_TIMEOUT = 5.0
PR_SET_PDEATHSIG = 1
# What every shim imports sooner or later: loaded once here, their pages are shared.
PRELOAD = (
    "ctrd.shim.serve", "ctrd.shim.service", "ctrd.shim.events", "ctrd.ttrpc.blocking",
    "ctrd.api.containerd.runtime.task.v2.shim_pb2", "ctrd.api.cgroups.v1.metrics_pb2",
    "ctrd.api.cgroups.v2.metrics_pb2", "google.protobuf.message_factory", "tempfile",
    "urllib.parse",
)


@dataclass
class SpawnRequest:
    namespace: str
    id: str
    bundle: str  # absolute: <state>/<namespace>/<id>
    address: str  # the daemon's gRPC address, what ``-address`` gives an exec'd shim
    ttrpc_address: str = ""  # the daemon's events endpoint (TTRPC_ADDRESS)
    debug: bool = False
    env: dict[str, str] = field(default_factory=dict)  # empty: the zygote's own
    options: bytes = b""  # runtime options (a serialized Any), as ``start`` reads on stdin

    def encode(self) -> bytes:
        return json.dumps({
            "namespace": self.namespace, "id": self.id, "bundle": self.bundle,
            "address": self.address, "ttrpc_address": self.ttrpc_address,
            "debug": self.debug, "env": self.env,
            "options": base64.b64encode(self.options).decode()}).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> SpawnRequest:
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise errors.InvalidArgument(f"zygote: request is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise errors.InvalidArgument("zygote: request must be a JSON object")
        strings = ("namespace", "id", "bundle", "address", "ttrpc_address", "options")
        for key in strings:
            if not isinstance(raw.get(key, ""), str):
                raise errors.InvalidArgument(f"zygote: {key} must be a string")
        env = raw.get("env") or {}
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise errors.InvalidArgument("zygote: env must map strings to strings")
        try:
            options = base64.b64decode(raw.get("options", ""), validate=True)
        except ValueError:
            raise errors.InvalidArgument("zygote: options must be base64") from None
        return cls(raw.get("namespace", ""), raw.get("id", ""), raw.get("bundle", ""),
                   raw.get("address", ""), raw.get("ttrpc_address", ""),
                   bool(raw.get("debug", False)), env, options)


def validate(request: SpawnRequest, state: str) -> None:
    """Refuse anything but a bundle the daemon laid out for this namespace and id."""
    try:
        identifiers.validate(request.namespace)
    except errors.InvalidArgument as exc:
        raise errors.InvalidArgument(f"invalid namespace: {exc}") from None
    try:
        identifiers.validate(request.id)
    except errors.InvalidArgument as exc:
        raise errors.InvalidArgument(f"invalid id: {exc}") from None
    if not request.address:
        raise errors.InvalidArgument("the daemon address is required")
    bundle = request.bundle
    if not os.path.isabs(bundle) or os.path.normpath(bundle) != bundle:
        raise errors.InvalidArgument(f"bundle {bundle!r} must be an absolute, clean path")
    state_real = os.path.realpath(state)
    real = os.path.realpath(bundle)
    if not real.startswith(state_real + os.sep):
        raise errors.PermissionDenied(f"bundle {bundle} is outside the state directory {state}")
    if real != os.path.join(state_real, request.namespace, request.id):
        raise errors.InvalidArgument(
            f"bundle {bundle} is not the bundle of {request.namespace}/{request.id}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise errors.NotFound(f"bundle {bundle} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise errors.InvalidArgument(f"bundle {bundle} is not a directory")
    if st.st_uid != os.getuid():
        raise errors.PermissionDenied(f"bundle {bundle} is not owned by the zygote's user")
    for key, value in request.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise errors.InvalidArgument(f"invalid environment variable {key!r}")


# --- the forked shim -------------------------------------------------------------


def _set_environment(env: dict[str, str]) -> None:
    """Replace the C environment too (runc inherits it), and let go of the strings
    the kernel placed after argv, which set_title may then overwrite."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.clearenv()
    os.environ.clear()
    os.environ.update(env)


def set_title(argv: list[str]) -> None:
    """Make /proc/self/cmdline read as ``argv`` by overwriting the memory the kernel
    reads it from (ps and pgrep then tell shims apart; PR_SET_MM would need
    CAP_SYS_RESOURCE). Fits in the zygote's own argv: arguments stay separate;
    longer: one string, spilling into the old environment strings (the kernel's
    setproctitle convention), which _set_environment has already let go of."""
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    # Fields 48-51 of stat (counted from 1; fields[0] here is field 3).
    arg_start, arg_end, env_start, env_end = (int(f) for f in fields[45:49])
    room = arg_end - arg_start
    title = b"\0".join(a.encode() for a in argv) + b"\0"
    if len(title) <= room:
        data = title.ljust(room, b"\0")
    elif env_start == arg_end:
        data = b" ".join(a.encode() for a in argv)[:env_end - arg_start - 1] + b"\0"
    else:
        data = title[:room - 1] + b"\0"
    ctypes.memmove(arg_start, data, len(data))


def _report(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode()[:4000])
    except OSError:
        pass


@dataclass
class _Spawn:
    """A request being answered: its connection, and the forked shim's report pipe."""

    conn: socket.socket
    buf: bytes = b""
    report: int = -1
    address: str = ""
    deadline: float = 0.0


class Zygote:
    def __init__(self, socket_path: str, state: str, log: Logger, parent: int = 0) -> None:
        self.parent = parent  # the daemon's pid; 0: whoever started us
        self.socket_path = socket_path
        self.state = state
        self.log = log
        self._sel = selectors.DefaultSelector()
        self._spawns: dict[int, _Spawn] = {}  # by connection fd
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket
        self._wake: tuple[int, int] | None = None
        self._stop = False

    def run(self) -> int:
        parent = self.parent or os.getppid()
        # Told at once when the parent (the daemon's thread that started us) dies, so a
        # restarted daemon's zygote finds the socket free; polling getppid() below
        # covers the rest.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            # The daemon died before we could ask to be told (a SIGKILL while this
            # interpreter was starting): nobody will ever ask us for a shim.
            self.log.info("zygote_parent_gone", parent=parent)
            return 0
        for name in PRELOAD:
            __import__(name)
        self._listener = _bind(self.socket_path)
        self._socket_id = _file_id(self.socket_path)
        self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(self._wake[1], warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)  # the wakeup fd tells the loop
        self._sel.register(self._listener, selectors.EVENT_READ, self._accept)
        self._sel.register(self._wake[0], selectors.EVENT_READ, self._on_signal)
        try:
            warmup.warm_up()
        except Exception as exc:  # noqa: BLE001 - only costs the shims some memory
            self.log.warning("zygote_warmup_failed", error=f"{type(exc).__name__}: {exc}")
        # Everything alive now is shared with every shim: neither reference counts
        # nor the collector may write to it in the children (nor here).
        gc.collect()
        started = time.monotonic()
        objects, marked = immortal.immortalize()
        gc.freeze()
        self.log.info("zygote_ready", socket=self.socket_path, state=self.state,
                      immortal=marked, objects=objects,
                      immortalize_ms=round((time.monotonic() - started) * 1000, 1))
        try:
            while not self._stop:
                for key, _ in self._sel.select(PARENT_POLL):
                    key.data(key.fileobj)
                self._expire()
                if os.getppid() != parent:
                    self.log.info("zygote_parent_gone")
                    break
        finally:
            self._close(unlink=True)
        return 0

    # --- the event loop's handlers -------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        if not peer_is_same_user(conn):
            conn.close()
            return
        conn.setblocking(False)
        self._spawns[conn.fileno()] = _Spawn(conn, deadline=time.monotonic() + READY_TIMEOUT)
        self._sel.register(conn, selectors.EVENT_READ, self._read_request)

    def _read_request(self, conn: socket.socket) -> None:
        spawn = self._spawns[conn.fileno()]
        try:
            data = conn.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._finish(spawn, None)
            return
        spawn.buf += data
        if b"\n" not in spawn.buf:
            if len(spawn.buf) > MAX_REQUEST:
                self._finish(spawn, errors.ResourceExhausted("zygote: request too large"))
            return
        self._sel.unregister(conn)
        line = spawn.buf.split(b"\n", 1)[0]
        try:
            self._spawn(spawn, SpawnRequest.decode(line))
        except Exception as exc:  # the requester gets the reason; the zygote keeps serving
            self._finish(spawn, exc)

    def _spawn(self, spawn: _Spawn, request: SpawnRequest) -> None:
        validate(request, self.state)
        log = self.log.bind(namespace=request.namespace, id=request.id)
        listener, address = shim_start.open_listener(
            request.bundle, request.id, request.namespace, request.address)
        spawn.address = address
        if listener is None:  # the group's shim already serves
            shim_start.write_address(request.bundle, address)
            self._finish(spawn, None)
            return
        try:
            shim_start.write_address(request.bundle, address)
            daemon_pid = _peer_pid(spawn.conn)
            spawn.report = self._fork(lambda report: self._become_shim(
                request, listener, address, daemon_pid, report))
        except BaseException:
            shim_start.remove_socket(address)
            raise
        finally:
            listener.close()
        log.debug("shim_forked", address=address)
        self._sel.register(spawn.report, selectors.EVENT_READ, lambda fd: self._on_report(spawn))

    def _on_report(self, spawn: _Spawn) -> None:
        try:
            message = os.read(spawn.report, 4096).decode(errors="replace")
        except OSError as exc:
            message = f"error {exc}"
        if message.startswith("ok "):
            self.log.info("shim_spawned", pid=message[3:], address=spawn.address)
            self._finish(spawn, None)
            return
        shim_start.remove_socket(spawn.address)
        reason = message.removeprefix("error ") or "the shim exited before serving"
        self._finish(spawn, errors.FailedPrecondition(f"zygote: {reason}"))

    def _on_signal(self, fd: int) -> None:
        try:
            data = os.read(fd, 128)
        except BlockingIOError:
            return
        if signal.SIGTERM in data or signal.SIGINT in data:
            self._stop = True
        while True:  # the middle processes of double forks
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _expire(self) -> None:
        now = time.monotonic()
        for spawn in [s for s in self._spawns.values() if s.deadline < now]:
            if spawn.report >= 0:
                shim_start.remove_socket(spawn.address)
            self._finish(spawn, errors.DeadlineExceeded("zygote: the shim did not report in time"))

    def _finish(self, spawn: _Spawn, error: BaseException | None) -> None:
        """Answer (unless the peer is gone) and forget the request."""
        self._spawns.pop(spawn.conn.fileno(), None)
        for fileobj in (spawn.conn, spawn.report):
            try:
                self._sel.unregister(fileobj)
            except (KeyError, ValueError):
                pass
        if spawn.report >= 0:
            os.close(spawn.report)
            spawn.report = -1
        if spawn.buf:
            if error is None:
                reply: dict[str, object] = {"address": spawn.address}
            else:
                code, message = errors.to_code(error)
                reply = {"error": message, "code": code}
                self.log.warning("spawn_refused", error=message)
            try:
                spawn.conn.setblocking(True)
                spawn.conn.settimeout(REPLY_TIMEOUT)
                spawn.conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass
        spawn.conn.close()

    # --- forking ----------------------------------------------------------------

    def _fork(self, child: Callable[[int], None]) -> int:
        """Double fork; ``child(report_fd)`` runs in the grandchild and never returns.
        Returns the read end of the pipe the grandchild reports on."""
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                if os.fork() == 0:
                    child(w)
            except BaseException as exc:
                _report(w, f"error {exc}")
            os._exit(0)
        os.close(w)
        return r

    def _become_shim(self, request: SpawnRequest, listener: socket.socket, address: str,
                     daemon_pid: int, report: int) -> None:
        code = 1
        try:
            os.setsid()  # leads its own session, as a shim ``start`` forked does
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            self._close(unlink=False)
            os.chdir(request.bundle)
            env = dict(request.env or os.environ)
            env.update({"TTRPC_ADDRESS": request.ttrpc_address, "GRPC_ADDRESS": request.address,
                        "NAMESPACE": request.namespace})
            _set_environment(env)
            set_title([NAME, "-namespace", request.namespace, "-id", request.id,
                       "-address", request.address])
            shim_start.null_stdio()
            cgroup = shim_start.shim_cgroup(request.options)
            if cgroup:
                shim_start.join_cgroup(cgroup, os.getpid())
            shim_start.adjust_oom_score(os.getpid(), daemon_pid)
            _report(report, f"ok {os.getpid()}")
            os.close(report)
            report = -1
            from ctrd.shim.serve import serve

            code = serve(listener, request.namespace, request.bundle, request.ttrpc_address,
                         address, request.debug)
        except BaseException as exc:
            if report >= 0:
                _report(report, f"error {exc}")
        finally:
            os._exit(code)

    def _close(self, unlink: bool) -> None:
        """Let go of the zygote's sockets (in the zygote at exit, in a forked shim at
        once: a shim must not keep the zygote's socket or other requests open)."""
        for spawn in list(self._spawns.values()):
            spawn.conn.close()
            if spawn.report >= 0:
                os.close(spawn.report)
        self._spawns.clear()
        self._sel.close()
        if self._wake is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._wake:
                os.close(fd)
            self._wake = None
        if self._listener is not None:
            # Only our own socket: a newer zygote may have taken over the path.
            if unlink and _file_id(self.socket_path) == self._socket_id:
                os.unlink(self.socket_path)
            self._listener.close()
            self._listener = None


def _bind(path: str) -> socket.socket:
    """Listen on ``path``, replacing the socket of a zygote that died, refusing to
    take over from one that still answers."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        else:
            raise errors.AlreadyExists(f"a zygote already listens on {path}")
        finally:
            probe.close()
    sock = shim_start.listen_private(path)
    sock.setblocking(False)
    return sock


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[:4], sys.byteorder, signed=True)


# --- the daemon's side -------------------------------------------------------------


async def spawn_via_zygote(sock_path: str, request: SpawnRequest,
                           timeout: float = 30.0) -> str:
    """Have the zygote at ``sock_path`` fork a shim; returns the shim's ttrpc address.

    Raises Unavailable when no zygote answers (no socket, refused, or it went away
    before answering): the caller then runs the shim binary's ``start`` instead,
    which is safe even if the zygote had forked the shim already, since ``start``
    finds it serving on the same address. Refusals come back as the error the
    zygote named (InvalidArgument, NotFound, PermissionDenied, ...)."""
    import asyncio

    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(sock_path, limit=MAX_REQUEST), timeout)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise errors.Unavailable(f"no shim zygote at {sock_path}: {exc}") from None
    try:
        writer.write(request.encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (ConnectionError, TimeoutError) as exc:
        raise errors.Unavailable(f"shim zygote at {sock_path}: {exc!r}") from None
    finally:
        writer.close()
    if not line:
        raise errors.Unavailable(f"shim zygote at {sock_path} closed without answering")
    reply = json.loads(line)
    if "error" in reply:
        raise errors.from_code(int(reply.get("code", errors.Unknown.code)), reply["error"])
    return str(reply["address"])


# --- command line -------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``containerd-shim-ctrd-v2 zygote -socket PATH -state DIR [-parent PID] [-debug]``;
    SIGTERM stops it, and so does its parent's death."""
    parser = argparse.ArgumentParser(prog=f"{NAME} zygote")
    parser.add_argument("-socket", "--socket", required=True, help="unix socket to listen on")
    parser.add_argument("-state", "--state", required=True,
                        help="the daemon's task state folder; bundles must live under it")
    parser.add_argument("-parent", "--parent", type=int, default=0,
                        help="the daemon's pid: exit at once if it is not our parent")
    parser.add_argument("-debug", "--debug", action="store_true")
    args = parser.parse_args(argv)
    log = Logger({"zygote_pid": os.getpid()}, "debug" if args.debug else "info")
    try:
        return Zygote(os.path.abspath(args.socket), os.path.abspath(args.state), log,
                      args.parent).run()
    except errors.CtrdError as exc:
        print(f"{NAME} zygote: {exc}", file=sys.stderr)
        return 1
