"""Issue 2: the daemon foundation, driven by the real `ctr` and raw gRPC calls."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import tomllib

import grpc
import pytest

from ctrd.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from ctrd.api.containerd.services.introspection.v1 import introspection_pb2_grpc
from ctrd.api.containerd.services.namespaces.v1 import namespace_pb2 as ns_pb
from ctrd.api.containerd.services.namespaces.v1 import namespace_pb2_grpc as ns_grpc
from google.protobuf import empty_pb2

pytestmark = pytest.mark.integration


def channel(daemon) -> grpc.Channel:
    return grpc.insecure_channel(f"unix://{daemon.address}")


def test_ctr_version_and_plugins(ctrd):
    out = ctrd.ctr("version").stdout
    assert "Server:" in out and "1.6.20+ctrd" in out
    plugins = ctrd.ctr("plugins", "ls").stdout
    for expected in ("io.containerd.grpc.v1", "namespaces", "introspection", "version"):
        assert expected in plugins
    assert " error" not in plugins.split("io.containerd.metadata.v1")[1].splitlines()[0]


def test_ctr_namespaces_and_events(ctrd):
    events = subprocess.Popen(["ctr", "--address", ctrd.address, "events"],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        ctrd.ctr("namespaces", "create", "alpha", "team=blue")
        ls = ctrd.ctr("namespaces", "ls").stdout
        assert any(line.split() == ["alpha", "team=blue"] for line in ls.splitlines())
        ctrd.ctr("namespaces", "label", "alpha", "team=red", "tier=1")
        ls = ctrd.ctr("namespaces", "ls", "-q").stdout.split()
        assert "alpha" in ls
        labels = ctrd.ctr("namespaces", "ls").stdout
        assert "team=red,tier=1" in labels
        ctrd.ctr("namespaces", "label", "alpha", "tier=")  # clears one label
        assert "tier" not in ctrd.ctr("namespaces", "ls").stdout
        ctrd.ctr("namespaces", "rm", "alpha")
        assert "alpha" not in ctrd.ctr("namespaces", "ls", "-q").stdout.split()
        time.sleep(0.5)
    finally:
        events.send_signal(signal.SIGTERM)
        out, _ = events.communicate(timeout=10)
    topics = [line.split()[5] for line in out.splitlines() if " alpha /namespaces/" in line]
    # `ctr namespaces label` sends one Update per label.
    assert topics == ["/namespaces/create"] + ["/namespaces/update"] * 3 + ["/namespaces/delete"]

    assert '"team":"blue"' in out


def test_bad_names_and_missing_namespace(ctrd):
    stub = ns_grpc.NamespacesStub(channel(ctrd))
    for name in ["", "Bad Name", "a" * 77, "-lead", "trail-", "dots..two", "../up", "x\x00y"]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Create(ns_pb.CreateNamespaceRequest(namespace=ns_pb.Namespace(name=name)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    with pytest.raises(grpc.RpcError) as err:
        stub.Create(ns_pb.CreateNamespaceRequest(
            namespace=ns_pb.Namespace(name="big", labels={"k": "v" * 5000})))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Get(ns_pb.GetNamespaceRequest(name="absent"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.Update(ns_pb.UpdateNamespaceRequest(
            namespace=ns_pb.Namespace(name="default"),
            update_mask={"paths": ["name"]}))
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    stub.Create(ns_pb.CreateNamespaceRequest(namespace=ns_pb.Namespace(name="dup")))
    with pytest.raises(grpc.RpcError) as err:
        stub.Create(ns_pb.CreateNamespaceRequest(namespace=ns_pb.Namespace(name="dup")))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    # Namespaced services need the containerd-namespace header, as in containerd
    # (which answers FailedPrecondition when it is missing).
    images = images_pb2_grpc.ImagesStub(channel(ctrd))
    with pytest.raises(grpc.RpcError) as err:
        images.List(images_pb2.ListImagesRequest())
    assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                grpc.StatusCode.UNIMPLEMENTED)
    if err.value.code() == grpc.StatusCode.FAILED_PRECONDITION:
        assert "namespace is required" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            images.List(images_pb2.ListImagesRequest(),
                        metadata=[("containerd-namespace", "no spaces allowed")])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing of the failed calls was stored.
    names = [n.name for n in stub.List(ns_pb.ListNamespacesRequest()).namespaces]
    assert names == ["dup"]


def test_concurrent_clients(ctrd):
    def work(i: int) -> None:
        stub = ns_grpc.NamespacesStub(channel(ctrd))
        name = f"ns{i}"
        stub.Create(ns_pb.CreateNamespaceRequest(namespace=ns_pb.Namespace(name=name)))
        for j in range(5):
            stub.Update(ns_pb.UpdateNamespaceRequest(
                namespace=ns_pb.Namespace(name=name, labels={f"k{j}": str(j)}),
                update_mask={"paths": [f"labels.k{j}"]}))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(work, range(40)))
    stub = ns_grpc.NamespacesStub(channel(ctrd))
    found = {n.name: dict(n.labels) for n in stub.List(ns_pb.ListNamespacesRequest()).namespaces}
    assert len(found) == 40
    assert all(labels == {f"k{j}": str(j) for j in range(5)} for labels in found.values())


def test_restart_keeps_data_and_identity(ctrd):
    ctrd.ctr("namespaces", "create", "keep", "a=1")
    intro = introspection_pb2_grpc.IntrospectionStub(channel(ctrd))
    first = intro.Server(empty_pb2.Empty())
    assert first.uuid and first.pid == ctrd.proc.pid
    assert ctrd.stop() == 0
    ctrd.start()
    assert "keep" in ctrd.ctr("namespaces", "ls").stdout
    second = introspection_pb2_grpc.IntrospectionStub(channel(ctrd)).Server(empty_pb2.Empty())
    assert second.uuid == first.uuid and second.pid == ctrd.proc.pid != first.pid


@pytest.mark.slow
def test_sigkill_during_write_burst(ctrd):
    stop = threading.Event()
    created: list[str] = []

    def burst(worker: int) -> None:
        stub = ns_grpc.NamespacesStub(channel(ctrd))
        i = 0
        while not stop.is_set():
            name = f"w{worker}-{i}"
            try:
                stub.Create(ns_pb.CreateNamespaceRequest(
                    namespace=ns_pb.Namespace(name=name, labels={"n": str(i), "pad": "x" * 500})),
                    timeout=5)
                created.append(name)
            except grpc.RpcError:
                return
            i += 1

    threads = [threading.Thread(target=burst, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    ctrd.kill()
    stop.set()
    for t in threads:
        t.join(10)
    assert created, "no write succeeded before the kill"
    db = ctrd.root / "io.containerd.metadata.v1.sqlite" / "meta.db"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    ctrd.start()
    stub = ns_grpc.NamespacesStub(channel(ctrd))
    stored = {n.name: dict(n.labels) for n in stub.List(ns_pb.ListNamespacesRequest()).namespaces}
    # Every acknowledged write survived, and no record is partial.
    assert set(created) <= set(stored)
    for name, labels in stored.items():
        assert labels["pad"] == "x" * 500 and name.endswith("-" + labels["n"])


def test_second_daemon_on_same_root_refused(ctrd, ctrd_factory):
    other = ctrd_factory()
    other.extra_args = ["--root", str(ctrd.root)]
    with pytest.raises(RuntimeError, match="in use by another ctrd"):
        other.start(timeout=10)
    assert other.proc.returncode == 1
    ctrd.ctr("version")  # the first daemon is untouched


def test_socket_mode_and_clean_exit(ctrd):
    mode = os.stat(ctrd.address).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    assert ctrd.stop() == 0
    assert not os.path.exists(ctrd.address)


def test_config_default_is_valid_toml():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ctrd"), "config",
                          "default"], capture_output=True, text=True, check=True).stdout
    data = tomllib.loads(out)
    assert data["root"] == "/var/lib/ctrd" and data["grpc"]["address"] == "/run/ctrd/ctrd.sock"


def test_bad_config_is_refused(ctrd_factory):
    daemon = ctrd_factory(config_text="[debug]\nformat = 'xml'\n")
    with pytest.raises(RuntimeError, match="xml"):
        daemon.start(timeout=10)


def test_stop_ends_event_streams_and_exits_zero(ctrd):
    events = subprocess.Popen(["ctr", "--address", ctrd.address, "events"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        start = time.monotonic()
        assert ctrd.stop() == 0
        assert time.monotonic() - start < 5, "an open event stream held up shutdown"
        events.wait(timeout=10)
    finally:
        if events.poll() is None:
            events.kill()
            events.wait()


def test_metrics_endpoint(ctrd_factory):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = ctrd_factory(config_text=f'[metrics]\naddress = "127.0.0.1:{port}"\n').start()
    daemon.ctr("namespaces", "ls")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'ctrd_grpc_requests_total{code="OK",method="/containerd.services.namespaces.v1.' \
        'Namespaces/List"}' in body
    assert "ctrd_grpc_request_duration_seconds_bucket" in body
