"""content.v1 with the real `ctr` and with a raw gRPC client for what ctr cannot send."""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time

import grpc
import pytest

from ctrd.api.containerd.services.content.v1 import content_pb2 as pb
from helpers.containerd_ref import ContainerdRef, containerd_ref, requires_containerd  # noqa: F401
from helpers.content_client import CONTENT_DIR, C, Client, S, W, blob_file, sha, wait_startup_gc
from helpers.ctrd_proc import CtrdProcess


@pytest.fixture
def ctrd(ctrd: CtrdProcess) -> CtrdProcess:
    return wait_startup_gc(ctrd)


@pytest.fixture
def client(ctrd: CtrdProcess):
    c = Client(ctrd.address)
    yield c
    c.close()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ---------------------------------------------------------------------------
# With ctr


def test_ingest_ls_get_label_rm(ctrd: CtrdProcess) -> None:
    data = os.urandom(300_000)
    digest = sha(data)
    ctrd.ctr("content", "ingest", "--expected-digest", digest, "--expected-size",
             str(len(data)), "my-ref", input=data)
    listing = ctrd.ctr("content", "ls").stdout
    assert re.search(rf"^{digest}\s+300kB\s", listing, re.M), listing
    assert ctrd.ctr("content", "get", digest, input=b"").stdout == data
    assert blob_file(ctrd, digest).stat().st_mode & 0o777 == 0o444

    ctrd.ctr("content", "label", digest, "a=1", "b=2")
    assert re.search(r"a=1,b=2|b=2,a=1", ctrd.ctr("content", "ls").stdout)
    ctrd.ctr("content", "label", digest, "b=")
    line = [ln for ln in ctrd.ctr("content", "ls").stdout.splitlines() if digest in ln][0]
    assert line.endswith("a=1")
    assert ctrd.ctr("content", "ls", "labels.a==1", "-q").stdout.split() == [digest]
    assert ctrd.ctr("content", "ls", "labels.a==2", "-q").stdout.split() == []

    ctrd.ctr("content", "rm", digest)
    assert digest not in ctrd.ctr("content", "ls", "-q").stdout
    failed = ctrd.ctr("content", "get", digest, check=False)
    assert failed.returncode != 0 and "not found" in failed.stderr
    # Nothing holds it any more: the collector removes the file soon after.
    deadline = time.monotonic() + 5
    while blob_file(ctrd, digest).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not blob_file(ctrd, digest).exists()


def test_wrong_expected_digest_commits_nothing(ctrd: CtrdProcess, client: Client) -> None:
    data = b"some bytes\n"
    wrong = sha(b"other bytes\n")
    r = ctrd.ctr("content", "ingest", "--expected-digest", wrong, "bad-ref",
                 input=data.decode(), check=False)
    assert r.returncode != 0
    assert "unexpected commit digest" in r.stderr and wrong in r.stderr
    assert ctrd.ctr("content", "ls", "-q").stdout.split() == []
    assert not blob_file(ctrd, sha(data)).exists()
    # Same over raw gRPC: FailedPrecondition, and the ingest is still there to fix.
    assert code_of(lambda: client.write(W(ref="raw", data=data), C(offset=len(data), expected=wrong))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert client.status("raw").offset == len(data)
    assert code_of(lambda: client.info(sha(data))) == grpc.StatusCode.NOT_FOUND


def test_active_lists_open_ingests(ctrd: CtrdProcess, client: Client) -> None:
    client.write(W(ref="partial-ref", total=100, data=b"x" * 40))
    out = ctrd.ctr("content", "active").stdout
    assert re.search(r"^partial-ref\s+40B\s", out, re.M), out
    ctrd.ctr("content", "active", "--timeout", "1h")  # the flag is accepted
    client.stub.Abort(pb.AbortRequest(ref="partial-ref"), metadata=client.metadata)
    assert "partial-ref" not in ctrd.ctr("content", "active").stdout


@requires_containerd
def test_content_ls_matches_containerd(ctrd: CtrdProcess, containerd_ref: ContainerdRef) -> None:
    blobs = [b"hello\n", os.urandom(5000), b""]
    outputs = []
    for daemon in (ctrd, containerd_ref):
        for i, data in enumerate(blobs):
            daemon.ctr("content", "ingest", f"r{i}", input=bytes(data))
        daemon.ctr("content", "label", sha(blobs[0]), "x=y")
        text = daemon.ctr("content", "ls").stdout
        # The AGE column depends on timing.
        outputs.append([re.sub(r"\t[^\t]*(second|minute)[^\t]*\t", "\tAGE\t", ln)
                        for ln in text.splitlines()])
        outputs.append(daemon.ctr("content", "active").stdout)
    assert outputs[0] == outputs[2]
    assert outputs[1] == outputs[3]


# ---------------------------------------------------------------------------
# The Write protocol, raw


def test_resume_from_reported_offset(client: Client) -> None:
    data = os.urandom(3 << 20)
    digest = sha(data)
    client.write(W(ref="resume", total=len(data), expected=digest, data=data[:1 << 20]))
    assert client.status("resume").offset == 1 << 20
    # A new stream: STAT tells where to go on, then the rest is sent from there.
    resp = client.write(S(ref="resume", total=len(data), expected=digest))
    assert resp[0].offset == 1 << 20 and resp[0].total == len(data)
    out = client.write(S(ref="resume"), W(offset=1 << 20, data=data[1 << 20:]),
                       C(offset=len(data), total=len(data), expected=digest, labels={"k": "v"}))
    assert out[-1].digest == digest and out[-1].offset == len(data)
    info = client.info(digest)
    assert info.size == len(data) and dict(info.labels) == {"k": "v"}
    assert client.read(digest) == data
    assert client.read(digest, offset=10, size=20) == data[10:30]
    assert code_of(lambda: client.status("resume")) == grpc.StatusCode.NOT_FOUND


def test_write_at_wrong_offset_and_restart_from_zero(client: Client) -> None:
    client.write(W(ref="off", data=b"abcdef"))
    assert code_of(lambda: client.write(W(ref="off", offset=3, data=b"zz"))) \
        == grpc.StatusCode.OUT_OF_RANGE
    # Offset 0 on a non-empty ingest starts it over, as containerd does.
    out = client.write(W(ref="off", offset=0, data=b"xy"), C(offset=2, expected=sha(b"xy")))
    assert out[-1].digest == sha(b"xy")


def test_more_bytes_than_total(client: Client) -> None:
    assert code_of(lambda: client.write(W(ref="big", total=4, data=b"12345"))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert client.status("big").offset == 0
    assert code_of(lambda: client.write(W(ref="big2", total=4, data=b"123"),
                                        W(offset=3, data=b"45"))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert client.status("big2").offset == 3
    # Commit with a size that is not what was written.
    assert code_of(lambda: client.write(W(ref="sz", data=b"123"), C(offset=3, total=5))) \
        == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "G" * 64,
                                 "", "sha256", "SHA256:" + "0" * 64, "sha512:" + "0" * 64])
def test_invalid_digests(client: Client, bad: str) -> None:
    assert code_of(lambda: client.info(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.read(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    if bad:
        assert code_of(lambda: client.write(W(ref="d", expected=bad, data=b"x"))) \
            == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: client.write(W(ref="d2", data=b"x"), C(offset=1, expected=bad))) \
            in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


def test_sha512_expected_digest(client: Client) -> None:
    data = b"five hundred and twelve"
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    out = client.write(W(ref="s512", data=data), C(offset=len(data), expected=digest))
    assert out[-1].digest == digest
    assert client.read(digest) == data


def test_hostile_refs(ctrd: CtrdProcess, client: Client) -> None:
    out = client.write(W(ref="../../../../etc/x", data=b"a"), C(offset=1))
    assert out[-1].digest == sha(b"a")
    client.write(W(ref="../escape", data=b"b"))
    assert client.status("../escape").offset == 1
    # Ingest folders are named by a hash of the ref: nothing lands outside the store.
    ingest = ctrd.root / CONTENT_DIR / "ingest"
    assert all(re.fullmatch(r"[0-9a-f]{64}", p.name) for p in ingest.iterdir())
    assert not (ctrd.root / "escape").exists()
    assert code_of(lambda: client.write(W(ref="a\x00b", data=b"x"))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.write(W(ref="x" * 5000, data=b"x"))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.write(W(data=b"x"))) == grpc.StatusCode.INVALID_ARGUMENT


def test_second_writer_on_same_ref_is_refused(client: Client) -> None:
    gate = threading.Event()
    first_done = threading.Event()

    def slow_requests():
        yield W(ref="locked", data=b"first")
        gate.wait(10)

    def run_first():
        try:
            list(client.stub.Write(slow_requests(), metadata=client.metadata, timeout=30))
        finally:
            first_done.set()

    t = threading.Thread(target=run_first)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if client.status("locked").offset == 5:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as err:
            client.write(W(ref="locked", offset=5, data=b"second"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "locked" in err.value.details()
    finally:
        gate.set()
        t.join(10)
    assert first_done.is_set()
    # Released: the ref can be resumed now.
    out = client.write(W(ref="locked", offset=5, data=b"second"), C(offset=11))
    assert out[-1].digest == sha(b"firstsecond")


def test_concurrent_writers_of_same_content(client: Client) -> None:
    data = os.urandom(2 << 20)
    digest = sha(data)
    results: list[object] = []

    def one(i: int) -> None:
        try:
            out = client.write(W(ref=f"conc-{i}", data=data[:1 << 20]),
                               W(offset=1 << 20, data=data[1 << 20:]),
                               C(offset=len(data), expected=digest))
            results.append(out[-1].digest)
        except grpc.RpcError as exc:
            results.append(exc.code())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(digest) >= 1
    assert all(r in (digest, grpc.StatusCode.ALREADY_EXISTS) for r in results), results
    assert client.read(digest) == data


def test_commit_existing_digest_already_exists(client: Client) -> None:
    client.write(W(ref="one", data=b"same"), C(offset=4))
    assert code_of(lambda: client.write(W(ref="two", data=b"same"), C(offset=4))) \
        == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: client.write(W(ref="three", expected=sha(b"same"), data=b"s"))) \
        == grpc.StatusCode.ALREADY_EXISTS
    # Neither left an ingest behind.
    listed = client.stub.ListStatuses(pb.ListStatusesRequest(), metadata=client.metadata)
    assert [s.ref for s in listed.statuses] == []


def test_namespaces_share_blobs_not_records(ctrd: CtrdProcess, client: Client) -> None:
    data = os.urandom(100_000)
    digest = sha(data)
    client.write(W(ref="n1", data=data),
                 C(offset=len(data), labels={"containerd.io/gc.root": "x"}))
    other = Client(ctrd.address, namespace="other")
    try:
        assert code_of(lambda: other.info(digest)) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: other.read(digest)) == grpc.StatusCode.NOT_FOUND
        # Expecting a blob the store already has: STAT shows it complete, no bytes sent.
        first = other.write(S(ref="n2", expected=digest, total=len(data)))
        assert first[0].offset == len(data)
        out = other.write(S(ref="n2", expected=digest, total=len(data)),
                          C(offset=len(data), expected=digest, total=len(data)))
        assert out[-1].digest == digest
        assert other.read(digest) == data
    finally:
        other.close()


def test_sigkill_mid_ingest_resumes_at_reported_offset(ctrd: CtrdProcess) -> None:
    data = os.urandom(5 << 20)
    digest = sha(data)
    c = Client(ctrd.address)
    gate = threading.Event()

    def requests():
        yield W(ref="crash", total=len(data), expected=digest, data=data[:2 << 20])
        yield W(offset=2 << 20, data=data[2 << 20:3 << 20])
        gate.wait(20)

    def stream() -> None:
        try:
            list(c.stub.Write(requests(), metadata=c.metadata, timeout=30))
        except grpc.RpcError:
            pass  # the daemon dies under it

    t = threading.Thread(target=stream)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if c.status("crash").offset >= 2 << 20:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.02)
        ctrd.kill()  # SIGKILL with the Write stream still open
    finally:
        gate.set()
        t.join(20)
        c.close()
    ctrd.start()
    wait_startup_gc(ctrd)
    c = Client(ctrd.address)
    try:
        offset = c.status("crash").offset
        assert 2 << 20 <= offset <= 3 << 20
        out = c.write(S(ref="crash", total=len(data), expected=digest),
                      W(offset=offset, data=data[offset:]),
                      C(offset=len(data), total=len(data), expected=digest))
        assert out[-1].digest == digest
        assert c.read(digest) == data
    finally:
        c.close()


def test_tampered_blob_is_not_served(ctrd: CtrdProcess, client: Client) -> None:
    data = os.urandom(20_000)
    digest = sha(data)
    client.write(W(ref="t", data=data),
                 C(offset=len(data), labels={"containerd.io/gc.root": "1"}))
    path = blob_file(ctrd, digest)
    path.chmod(0o644)
    path.write_bytes(b"X" + data[1:])  # same size, different bytes
    r = ctrd.ctr("content", "get", digest, check=False)
    assert r.returncode != 0 and "corrupt" in r.stderr
    # Once caught, the blob is gone from view until it is written again.
    assert code_of(lambda: client.info(digest)) == grpc.StatusCode.NOT_FOUND
    out = client.write(W(ref="t2", data=data), C(offset=len(data), expected=digest))
    assert out[-1].digest == digest
    assert client.read(digest) == data
    # A size change is caught by Info itself.
    path.chmod(0o644)
    with open(path, "ab") as f:
        f.write(b"more")
    assert code_of(lambda: client.info(digest)) == grpc.StatusCode.DATA_LOSS
