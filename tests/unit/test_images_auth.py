"""WWW-Authenticate parsing, pull credentials, and the registry hosts config."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from cri.images.auth import Credentials, parse_www_authenticate
from cri.images.errors import HostsConfigError, RegistryUnauthenticated
from cri.images.hosts import Endpoint, RegistryHosts, is_loopback_host


def test_bearer_challenge() -> None:
    (c,) = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull",
    }


def test_several_challenges_and_odd_spacing() -> None:
    challenges = parse_www_authenticate(
        'Basic realm="Registry Realm" , Bearer  realm = "https://t.example/tok" ,'
        ' service=reg , error="invalid_token"'
    )
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[0].params == {"realm": "Registry Realm"}
    assert challenges[1].params == {
        "realm": "https://t.example/tok",
        "service": "reg",
        "error": "invalid_token",
    }


def test_quoted_commas_and_escapes() -> None:
    (c,) = parse_www_authenticate(
        r'Bearer realm="https://x/token",scope="repository:a:pull,push",note="say \"hi\""'
    )
    assert c.params["scope"] == "repository:a:pull,push"
    assert c.params["note"] == 'say "hi"'


def test_case_insensitive_scheme_and_keys() -> None:
    (c,) = parse_www_authenticate('BEARER Realm="r",SERVICE="s"')
    assert c.scheme == "bearer" and c.params == {"realm": "r", "service": "s"}


@pytest.mark.parametrize("header", ["", "   ", ",,,", '="x"', "Basic"])
def test_degenerate_headers(header: str) -> None:
    challenges = parse_www_authenticate(header)
    assert all(not c.params for c in challenges)


def test_unterminated_quote_does_not_hang() -> None:
    (c,) = parse_www_authenticate('Bearer realm="https://x')
    assert c.params["realm"] == "https://x"


def test_credentials_from_auth_field() -> None:
    auth = base64.b64encode(b"bob:s3cret:with:colons").decode()
    creds = Credentials.from_auth_config(auth=auth)
    assert creds is not None
    assert creds.username == "bob" and creds.password == "s3cret:with:colons"
    assert creds.basic_header() == "Basic " + auth


def test_explicit_username_wins_over_auth() -> None:
    auth = base64.b64encode(b"bob:x").decode()
    creds = Credentials.from_auth_config(username="alice", password="y", auth=auth)
    assert creds is not None and creds.username == "alice"


def test_empty_auth_config_is_anonymous() -> None:
    assert Credentials.from_auth_config() is None
    assert Credentials.from_auth_config(server_address="quay.io") is None


def test_bad_auth_field_is_a_clear_error() -> None:
    with pytest.raises(RegistryUnauthenticated, match="base64"):
        Credentials.from_auth_config(auth="!!!notbase64")
    with pytest.raises(RegistryUnauthenticated, match="':'"):
        Credentials.from_auth_config(auth=base64.b64encode(b"nocolon").decode())


def test_secrets_never_in_repr() -> None:
    creds = Credentials.from_auth_config(
        username="alice", password="hunter2", identity_token="idtok", registry_token="regtok"
    )
    text = repr(creds) + str(creds)
    for secret in ("alice", "hunter2", "idtok", "regtok"):
        assert secret not in text
    assert creds is not None and "hunter2" not in creds.fingerprint()


def test_credentials_scope_to_their_server() -> None:
    anywhere = Credentials("u", "p")
    assert anywhere.applies_to("127.0.0.1:5000", "registry.k8s.io", mirror=True)
    scoped = Credentials("u", "p", server_address="https://registry.k8s.io")
    assert scoped.applies_to("registry.k8s.io", "registry.k8s.io", mirror=False)
    assert not scoped.applies_to("127.0.0.1:5000", "registry.k8s.io", mirror=True)
    hub = Credentials("u", "p", server_address="https://index.docker.io/v1/")
    assert hub.applies_to("registry-1.docker.io", "docker.io", mirror=False)
    assert not hub.applies_to("quay.io", "quay.io", mirror=False)


# --------------------------------------------------------------------------- hosts


def test_hosts_from_toml_table(tmp_path: Path) -> None:
    hosts = RegistryHosts.from_dict(
        {
            "mirrors": {
                "registry.k8s.io": {"endpoints": ["http://127.0.0.1:5000"]},
                "index.docker.io": {"endpoints": ["mirror.example:5000", "https://m2.example"]},
            },
            "insecure": ["lab.example:5000"],
            "configs": {
                "corp.example": {"ca_file": str(tmp_path / "ca.pem")},
                "self-signed.example": {"insecure_skip_verify": True},
            },
        }
    )
    assert hosts.mirrors["registry.k8s.io"] == ["http://127.0.0.1:5000"]
    assert "docker.io" in hosts.mirrors
    assert hosts.insecure == {"lab.example:5000", "self-signed.example"}
    assert hosts.ca_files == {"corp.example": tmp_path / "ca.pem"}

    k8s = hosts.endpoints("registry.k8s.io")
    assert k8s == [
        Endpoint("http://127.0.0.1:5000", "127.0.0.1:5000", False, mirror=True),
        Endpoint("https://registry.k8s.io", "registry.k8s.io", True, mirror=False),
    ]
    assert k8s[0].api("pause/manifests/3.9") == "http://127.0.0.1:5000/v2/pause/manifests/3.9"
    hub = hosts.endpoints("docker.io")
    assert [e.url for e in hub] == [
        "https://mirror.example:5000",
        "https://m2.example",
        "https://registry-1.docker.io",
    ]
    assert [e.url for e in hosts.endpoints("lab.example:5000")] == [
        "https://lab.example:5000",
        "http://lab.example:5000",
    ]
    assert hosts.endpoints("corp.example")[0].verify == str(tmp_path / "ca.pem")
    assert hosts.endpoints("self-signed.example")[0].verify is False


def test_loopback_registries_are_plain_http_without_config() -> None:
    hosts = RegistryHosts()
    for host in ("127.0.0.1:5000", "localhost:5000", "localhost", "[::1]:5000"):
        (endpoint,) = hosts.endpoints(host)
        assert endpoint.url == f"http://{host}"
    (remote,) = hosts.endpoints("quay.io")
    assert remote.url == "https://quay.io" and remote.verify is True


def test_mirror_with_path_prefix() -> None:
    hosts = RegistryHosts(mirrors={"docker.io": ["https://proxy.example/v2"]})
    assert hosts.endpoints("docker.io")[0].api("a/b") == "https://proxy.example/v2/a/b"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"mirror": {}}, "unknown keys"),
        ({"mirrors": []}, "must be a table"),
        ({"mirrors": {"r": {"endpoint": ["x"]}}}, "needs endpoints"),
        ({"mirrors": {"r": {"endpoints": [5]}}}, "not a string"),
        ({"mirrors": {"r": {"endpoints": ["ftp://x"]}}}, "http"),
        ({"insecure": "host"}, "list"),
        ({"configs": {"h": {"ca": "x"}}}, "unknown keys"),
        ({"configs": {"h": {"insecure_skip_verify": "yes"}}}, "true or false"),
    ],
)
def test_bad_hosts_config_says_what_to_fix(table: dict[str, object], message: str) -> None:
    with pytest.raises(HostsConfigError, match=message):
        RegistryHosts.from_dict(table)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1", True),
        ("127.1.2.3:80", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("registry.k8s.io", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
