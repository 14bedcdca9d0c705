"""A real registry for tests: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

Optional TLS with a test CA made here, htpasswd Basic auth, or token auth pointed
at :class:`TokenServer`, a small JWT issuer running in a thread. Images are pushed
with skopeo from OCI layouts built by :mod:`ctrd.oci.writer`.
"""
from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from ctrd.oci import writer

REGISTRY_BIN = "/usr/bin/docker-registry"
SKOPEO = "/usr/bin/skopeo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


# ---------------------------------------------------------------------------
# Certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class TestCA:
    """A CA with a server certificate for 127.0.0.1/localhost and a client certificate."""

    __test__ = False  # not a pytest class despite the name

    dir: Path
    ca_cert: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)
    client_cert: Path = field(init=False)
    client_key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = _key()
        ca = (x509.CertificateBuilder().subject_name(_name("ctrd test CA"))
              .issuer_name(_name("ctrd test CA")).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                           False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        self.ca_cert = self._write("ca.crt", ca.public_bytes(serialization.Encoding.PEM))
        self.server_cert, self.server_key = self._issue(
            ca, ca_key, "server", [x509.DNSName("localhost"),
                                   x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        self.client_cert, self.client_key = self._issue(ca, ca_key, "client", None)

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def _issue(self, ca: x509.Certificate, ca_key: rsa.RSAPrivateKey, cn: str,
               sans: list[x509.GeneralName] | None) -> tuple[Path, Path]:
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return (self._write(f"{cn}.cert", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{cn}.key", _pem_key(key)))


# ---------------------------------------------------------------------------
# Token server


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry JWTs (distribution's token auth) to users in ``users``.

    ``users`` maps name -> password; anonymous requests get pull-only tokens when
    ``anonymous_pull`` is set. Every request is recorded in ``requests``.
    """

    def __init__(self, directory: Path, users: dict[str, str] | None = None, *,
                 anonymous_pull: bool = False, service: str = "ctrd-test-registry",
                 issuer: str = "ctrd-test-issuer", lifetime: int = 300) -> None:
        self.users = users or {}
        self.anonymous_pull = anonymous_pull
        self.service = service
        self.issuer = issuer
        self.lifetime = lifetime
        self.requests: list[dict] = []
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name("ctrd token signer"))
                     .issuer_name(_name("ctrd token signer")).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .sign(self.key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        self.bundle = directory / "token-signer.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.port = free_port()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def issue(self, user: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a and (user or a == "pull")]
            access.append({"type": kind, "name": name, "actions": granted})
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + self.lifetime,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _user(self) -> str | None:
                """"" for anonymous, the name for good credentials, None for bad ones."""
                header = self.headers.get("authorization", "")
                if not header.lower().startswith("basic "):
                    return ""
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                return user if owner.users.get(user) == password else None

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                user = self._user()
                owner.requests.append({"method": "GET", "user": user, "query": query})
                if user is None or (user == "" and not owner.anonymous_pull):
                    self._reply(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                    return
                token = owner.issue(user, query.get("scope", []))
                self._reply(200, {"token": token, "expires_in": owner.lifetime})

        return Handler


# ---------------------------------------------------------------------------
# The registry


@dataclass
class Registry:
    root: Path
    port: int
    proc: subprocess.Popen
    tls: TestCA | None = None
    users: dict[str, str] = field(default_factory=dict)
    token: TokenServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def log(self) -> str:
        return (self.root / "registry.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def skopeo_push(self, source: str, repo_tag: str, *, all_platforms: bool = False) -> None:
        """``skopeo copy SOURCE docker://HOST/REPO_TAG`` with this registry's auth and TLS."""
        args = [SKOPEO, "--insecure-policy", "copy", "-q", "--preserve-digests"]
        if all_platforms:
            args.append("--all")
        args += self._skopeo_dest_args()
        args += [source, f"docker://{self.host}/{repo_tag}"]
        subprocess.run(args, check=True, capture_output=True, timeout=120)

    def _skopeo_dest_args(self) -> list[str]:
        args = []
        if self.tls:
            certs = self.root / "skopeo-certs"
            certs.mkdir(exist_ok=True)
            shutil.copy(self.tls.ca_cert, certs / "ca.crt")
            args += ["--dest-cert-dir", str(certs), "--dest-tls-verify=true"]
        else:
            args.append("--dest-tls-verify=false")
        users = self.users or (self.token.users if self.token else {})
        if users:
            user, password = next(iter(users.items()))
            args += ["--dest-creds", f"{user}:{password}"]
        return args

    def push_image(self, image: writer.Image, repo_tag: str, tmp: Path) -> None:
        """Push a built image (single or multi-platform) as ``repo:tag``, digests unchanged.

        Goes through skopeo's ``dir:`` transport, which (unlike ``oci:``) takes Docker
        media types too and copies manifests byte for byte.
        """
        directory = tmp / f"dir-{uuid.uuid4().hex[:8]}"
        write_dir(directory, image)
        self.skopeo_push(f"dir:{directory}", repo_tag, all_platforms=image.is_index)


def write_dir(directory: Path, image: writer.Image) -> None:
    """An image in containers/image's ``dir:`` layout (manifest.json, blobs by hex digest)."""
    directory.mkdir(parents=True)
    (directory / "version").write_text("Directory Transport Version: 1.1\n")
    (directory / "manifest.json").write_bytes(image.root.data)
    for blob in image.blobs:
        hexpart = blob.digest.split(":", 1)[1]
        if blob is not image.root and (blob.media_type.endswith("manifest.v1+json")
                                       or blob.media_type.endswith("manifest.v2+json")):
            (directory / f"{hexpart}.manifest.json").write_bytes(blob.data)
        (directory / hexpart).write_bytes(blob.data)


def start_registry(root: Path, *, tls: TestCA | None = None, users: dict[str, str] | None = None,
                   token: TokenServer | None = None, client_ca: bool = False) -> Registry:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = [
        "version: 0.1",
        "log:", "  level: info", "  accesslog:", "    disabled: true",
        "storage:", "  filesystem:", f"    rootdirectory: {root / 'data'}",
        "  delete:", "    enabled: true",
        "http:", f"  addr: 127.0.0.1:{port}",
    ]
    if tls:
        lines += ["  tls:", f"    certificate: {tls.server_cert}", f"    key: {tls.server_key}"]
        if client_ca:
            lines += ["    clientcas:", f"      - {tls.ca_cert}"]
    if users:
        htpasswd = root / "htpasswd"
        htpasswd.write_text("".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
            for u, p in users.items()))
        lines += ["auth:", "  htpasswd:", "    realm: ctrd-test", f"    path: {htpasswd}"]
    elif token:
        lines += ["auth:", "  token:", f"    realm: {token.realm}", f"    service: {token.service}",
                  f"    issuer: {token.issuer}", f"    rootcertbundle: {token.bundle}"]
    config = root / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log = open(root / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, env={**os.environ, "OTEL_SDK_DISABLED": "1"})
    log.close()
    registry = Registry(root, port, proc, tls, dict(users or {}), token)
    try:
        wait_port(port)
    except TimeoutError:
        registry.stop()
        raise RuntimeError(f"docker-registry did not start:\n{registry.log()}") from None
    return registry
