"""The long-lived shim process: serve the Task API until told to shut down.

The main thread waits on one selector for signals (SIGCHLD means reap; SIGTERM and
SIGINT mean stop), the Shutdown call, new ttrpc connections, OOM notifications and
stdin fifos nobody has written to yet; each connection and each request runs on a
thread of its own. Nothing run here may block. Every thread a shim
keeps costs it ~36 KiB, so what only needs waking up waits here.
"""
from __future__ import annotations

import ctypes
import os
import selectors
import signal
import socket
import threading

from ctrd.shim.log import Logger

PR_SET_CHILD_SUBREAPER = 36
WAKE = b"\0"  # written by us (not a signal number) to make the main loop look around


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def redirect_stderr_to_log_fifo(bundle: str) -> None:
    """The daemon reads the bundle's ``log`` fifo; a missing reader must not block us."""
    try:
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    os.dup2(fd, 2)
    os.close(fd)


def serve(listener: socket.socket, namespace: str, bundle: str, ttrpc_address: str,
          address: str, debug: bool) -> int:
    # Imported here so that `start` and `delete` do not pay for them.
    from ctrd.api.containerd.runtime.task.v2 import shim_pb2
    from ctrd.shim.events import Publisher
    from ctrd.shim.service import TaskService
    from ctrd.ttrpc.blocking import Server

    redirect_stderr_to_log_fifo(bundle)
    log = Logger({"namespace": namespace, "shim_pid": os.getpid()}, "debug" if debug else "info")
    become_subreaper()

    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    stop = threading.Event()
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        # The handler does nothing: the wakeup fd already tells the main loop.
        signal.signal(sig, lambda *_: None)

    def request_shutdown() -> None:
        stop.set()
        try:
            os.write(wake_w, WAKE)
        except OSError:
            pass

    selector = selectors.DefaultSelector()
    publisher = Publisher(ttrpc_address, namespace, log)
    service = TaskService(namespace, publisher, log, request_shutdown, selector)

    class ShimServer(Server):
        def on_error(self, exc: Exception) -> None:
            from ctrd.errors import CtrdError

            if not isinstance(exc, CtrdError):
                log.error("request_failed", error=f"{type(exc).__name__}: {exc}")

    server = ShimServer()
    server.register_impl(shim_pb2.DESCRIPTOR.services_by_name["Task"], service)
    listener.setblocking(False)

    def on_wake(fd: int) -> None:
        try:
            data = os.read(fd, 128)
        except (BlockingIOError, InterruptedError):
            return
        if signal.SIGCHLD in data:
            service.reaper.reap()
        if signal.SIGTERM in data or signal.SIGINT in data:
            log.info("exit_signal")
            stop.set()

    selector.register(wake_r, selectors.EVENT_READ, on_wake)
    selector.register(listener, selectors.EVENT_READ, lambda _: server.accept(listener))
    log.info("serving", address=address)

    service.reaper.reap()  # children that exited before the handler was in place
    while not stop.is_set():
        for key, _ in selector.select():
            key.data(key.fd)

    selector.unregister(listener)
    listener.close()
    server.shutdown(grace=2.0)
    publisher.close()
    if address.startswith("unix://"):
        try:
            os.unlink(address[len("unix://"):])
        except OSError:
            pass
    log.info("shutdown")
    return 0
