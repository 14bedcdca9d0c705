"""References, certs.d hosts configuration, auth challenges and credentials files."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ctrd import reference
from ctrd.daemon.remotes import platforms
from ctrd.daemon.remotes.auth import load_docker_config, parse_challenges
from ctrd.daemon.remotes.hosts import HostsConfig, is_localhost
from ctrd.errors import InvalidArgument

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("text,expected", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("user/app:v1", "docker.io/user/app:v1"),
    ("index.docker.io/user/app", "docker.io/user/app:latest"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/a/b:c", "localhost:5000/a/b:c"),
    ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
    ("[::1]:5000/x:y", "[::1]:5000/x:y"),
    ("Registry.Example.com/app", "Registry.Example.com/app:latest"),
    (f"quay.io/a/b@{DIGEST}", f"quay.io/a/b@{DIGEST}"),
    (f"quay.io/a/b:t@{DIGEST}", f"quay.io/a/b:t@{DIGEST}"),
])
def test_normalize(text: str, expected: str) -> None:
    assert str(reference.normalize(text)) == expected


def test_reference_parts() -> None:
    ref = reference.normalize(f"[::1]:5000/team/app:v2@{DIGEST}")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("[::1]:5000", "team/app", "v2", DIGEST)
    assert ref.object == DIGEST
    assert reference.normalize("busybox").familiar() == "busybox:latest"


@pytest.mark.parametrize("text", [
    "", "BusyBox", "a" * 64, "foo@sha256:abc", "foo:bad tag", "foo/../bar", "x:" + "t" * 129,
    "/foo", "foo/"])
def test_invalid_references(text: str) -> None:
    with pytest.raises(InvalidArgument):
        reference.normalize(text)


def test_default_hosts() -> None:
    cfg = HostsConfig(config_dir=None)
    [hub] = cfg.hosts("docker.io")
    assert hub.base_url == "https://registry-1.docker.io/v2"
    [local] = cfg.hosts("127.0.0.1:5000")
    assert local.scheme == "http"
    [other] = cfg.hosts("quay.io")
    assert other.scheme == "https"
    [forced] = HostsConfig(config_dir=None, plain_http=frozenset({"reg:80"})).hosts("reg:80")
    assert forced.scheme == "http"
    assert is_localhost("[::1]:5000") and is_localhost("localhost") and not is_localhost("a.b")


def test_hosts_toml(tmp_path: Path) -> None:
    directory = tmp_path / "reg.example:5000"
    directory.mkdir()
    (directory / "hosts.toml").write_text('''
server = "https://reg.example:5000"
ca = "ca.crt"

[host."https://mirror-b.local"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  client = [["c.cert", "c.key"]]
  [host."https://mirror-b.local".header]
    x-a = "1"
    x-b = ["2", "3"]

[host."http://mirror-a.local/base"]
  capabilities = ["pull"]
''')
    hosts = HostsConfig(config_dir=str(tmp_path)).hosts("reg.example:5000")
    assert [h.base_url for h in hosts] == [
        "https://mirror-b.local/v2", "http://mirror-a.local/base/v2", "https://reg.example:5000/v2"]
    assert hosts[0].capabilities == {"pull", "resolve"} and hosts[0].tls.skip_verify
    assert hosts[0].tls.client_pairs == ((str(directory / "c.cert"), str(directory / "c.key")),)
    assert hosts[0].headers == (("x-a", "1"), ("x-b", "2"), ("x-b", "3"))
    assert hosts[2].tls.ca_certs == (str(directory / "ca.crt"),)
    assert hosts[2].capabilities == {"pull", "resolve", "push"}


def test_certs_dir_without_hosts_toml(tmp_path: Path) -> None:
    directory = tmp_path / "reg_5000_"
    directory.mkdir()
    for name in ("ca.crt", "client.cert", "client.key"):
        (directory / name).write_text("x")
    [host] = HostsConfig(config_dir=str(tmp_path)).hosts("reg:5000")
    assert host.base_url == "https://reg:5000/v2"
    assert host.tls.ca_certs == (str(directory / "ca.crt"),)
    assert host.tls.client_pairs == ((str(directory / "client.cert"),
                                      str(directory / "client.key")),)


def test_broken_hosts_toml_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."x"]\ncapabilities = ["fly"]\n')
    with pytest.raises(InvalidArgument, match="capability"):
        HostsConfig(config_dir=str(tmp_path)).hosts("anything.example")


def test_parse_challenges() -> None:
    [bearer] = parse_challenges([
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push",error="insufficient_scope"'])
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "https://auth.example/token", "service": "registry.example",
                             "scope": "repository:a/b:pull,push", "error": "insufficient_scope"}
    basic, bearer2 = parse_challenges(['Basic realm="r", Bearer realm="t"'])
    assert (basic.scheme, basic.params, bearer2.params) == ("basic", {"realm": "r"}, {"realm": "t"})


def test_docker_config(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
        "reg:5000": {"username": "u", "password": "p"},
        "http://other/v2/": {"identitytoken": "tok"},
    }}))
    table = load_docker_config(path)
    expected = "Basic " + base64.b64encode(b"hub:pw").decode()
    assert table["index.docker.io"].basic_header() == expected
    assert (table["reg:5000"].username, table["reg:5000"].secret) == ("u", "p")
    assert table["other"].is_refresh_token
    assert load_docker_config(tmp_path / "missing.json") == {}


def test_platform_matching() -> None:
    amd64 = platforms.Matcher.of([platforms.parse("linux/amd64")])
    assert amd64.match(platforms.parse("linux/amd64"))
    assert not amd64.match(platforms.parse("linux/arm64"))
    arm = platforms.Matcher.of([platforms.parse("linux/arm/v7")])
    assert arm.rank(platforms.parse("linux/arm/v7")) < arm.rank(platforms.parse("linux/arm/v6"))
    assert not arm.match(platforms.parse("linux/arm/v8"))
    assert platforms.parse("aarch64") == platforms.parse("linux/arm64/v8")
    assert platforms.Matcher(()).match(None)
    with pytest.raises(InvalidArgument):
        platforms.parse("linux//amd64")
