"""The ``delete`` action: clean up the bundle of a shim that is gone.

Called by the daemon when a shim died or never came up: force-delete the runc
container, unmount the rootfs, and print a DeleteResponse (protobuf bytes) on stdout.
"""
from __future__ import annotations

import json
import os
import signal
import time

from ctrd import errors
from ctrd.shim.log import Logger
from ctrd.shim.mount import unmount_all
from ctrd.shim.reaper import Reaper
from ctrd.shim.runc import DEFAULT_ROOT, Runc


def delete(namespace: str, id: str, bundle: str) -> int:
    from ctrd.api.containerd.runtime.task.v2 import shim_pb2
    from ctrd.shim.events import timestamp

    log = Logger({"namespace": namespace, "id": id, "action": "delete"})
    options: dict[str, object] = {}
    try:
        with open(os.path.join(bundle, "options.json")) as f:
            options = json.load(f)
    except (OSError, ValueError):
        pass
    runc = Runc(Reaper(lambda exit: None, active=False),
                str(options.get("BinaryName") or "runc"),
                os.path.join(str(options.get("Root") or DEFAULT_ROOT), namespace),
                os.path.join(bundle, "log.json"), bool(options.get("SystemdCgroup")))
    try:
        runc.delete(id, force=True)
    except errors.CtrdError as exc:
        log.warning("runc_delete_failed", error=str(exc))
    try:
        unmount_all(os.path.join(bundle, "rootfs"))
    except OSError as exc:
        log.warning("rootfs_unmount_failed", error=str(exc))
    pid = 0
    try:
        with open(os.path.join(bundle, "init.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pass
    resp = shim_pb2.DeleteResponse(pid=pid, exit_status=128 + signal.SIGKILL,
                                   exited_at=timestamp(time.time()))
    os.write(1, resp.SerializeToString())
    return 0
