"""Forwarding task events to the daemon's ttrpc events service (TTRPC_ADDRESS).

Events go out in order from one thread, which also reads each answer (no reader
thread: each one costs a running shim ~36 KiB). A failed forward is retried a few
times with a growing pause, reconnecting if the connection died, as the Go shim does.
"""
from __future__ import annotations

import queue
import threading
import time

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from ctrd import errors
from ctrd.api.containerd.services.ttrpc.events.v1 import events_pb2
from ctrd.shim.log import Logger
from ctrd.ttrpc.blocking import SerialClient

SERVICE = "containerd.services.events.ttrpc.v1.Events"
MAX_ATTEMPTS = 6
FORWARD_TIMEOUT = 5.0

TOPICS = {
    "TaskCreate": "/tasks/create",
    "TaskStart": "/tasks/start",
    "TaskOOM": "/tasks/oom",
    "TaskExit": "/tasks/exit",
    "TaskDelete": "/tasks/delete",
    "TaskExecAdded": "/tasks/exec-added",
    "TaskExecStarted": "/tasks/exec-started",
    "TaskPaused": "/tasks/paused",
    "TaskResumed": "/tasks/resumed",
    "TaskCheckpointed": "/tasks/checkpointed",
}


def pack_any(msg: Message) -> any_pb2.Any:
    # containerd's typeurl names types by their bare full name, without the
    # type.googleapis.com/ prefix protobuf's Any.Pack would add.
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class Publisher:
    def __init__(self, address: str, namespace: str, log: Logger) -> None:
        self._address = address
        self._namespace = namespace
        self._log = log
        self._queue: queue.Queue[events_pb2.Envelope | None] = queue.Queue()
        self._client: SerialClient | None = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def publish(self, event: Message) -> None:
        topic = TOPICS[event.DESCRIPTOR.name]
        env = events_pb2.Envelope(timestamp=timestamp(time.time()), namespace=self._namespace,
                                  topic=topic, event=pack_any(event))
        self._queue.put(env)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (for up to ``timeout`` seconds), then disconnect."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._client is not None:
            self._client.close()

    def _run(self) -> None:
        while True:
            env = self._queue.get()
            if env is None:
                return
            self._forward(env)

    def _forward(self, env: events_pb2.Envelope) -> None:
        if not self._address:
            return  # nobody to tell (a shim started by hand)
        req = events_pb2.ForwardRequest(envelope=env).SerializeToString()
        for attempt in range(MAX_ATTEMPTS):
            try:
                if self._client is None or self._client.closed:
                    self._client = SerialClient.connect(self._address, timeout=FORWARD_TIMEOUT)
                self._client.call_raw(SERVICE, "Forward", req, timeout=FORWARD_TIMEOUT)
                return
            except (errors.CtrdError, OSError) as exc:
                self._log.warning("forward_event_failed", topic=env.topic, attempt=attempt,
                                  error=str(exc))
                if isinstance(exc, (errors.Unavailable, OSError)) and self._client is not None:
                    self._client.close()
                    self._client = None
                time.sleep(min(attempt + 1, 5) if attempt else 0.05)
        self._log.error("event_dropped", topic=env.topic)
