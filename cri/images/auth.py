"""Registry credentials and the ``WWW-Authenticate`` challenge.

Credentials come from the CRI ``AuthConfig`` (kubelet fills it from image pull
secrets). They are kept in memory only, never logged (``repr`` hides them) and never
put on a command line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field

from cri.images.errors import RegistryUnauthenticated


@dataclass(frozen=True)
class Challenge:
    """One authentication challenge: a scheme (lowercase) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into its challenges (RFC 7235).

    ``Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"``
    gives one bearer challenge with three parameters. Several challenges may share one
    header (``Basic realm="x", Bearer realm="y"``). Malformed parts are skipped.
    """
    challenges: list[Challenge] = []
    pos, n = 0, len(header)

    def skip(chars: str) -> None:
        nonlocal pos
        while pos < n and header[pos] in chars:
            pos += 1

    def token() -> str:
        nonlocal pos
        start = pos
        while pos < n and header[pos] not in ' \t,="':
            pos += 1
        return header[start:pos]

    current: Challenge | None = None
    while pos < n:
        skip(" \t,")
        if pos >= n:
            break
        start = pos
        name = token()
        if not name:
            pos += 1
            continue
        after_name = pos
        skip(" \t")
        if pos < n and header[pos] == "=" and current is not None:
            pos += 1
            skip(" \t")
            if pos < n and header[pos] == '"':
                pos += 1
                chars: list[str] = []
                while pos < n and header[pos] != '"':
                    if header[pos] == "\\" and pos + 1 < n:
                        pos += 1
                    chars.append(header[pos])
                    pos += 1
                pos += 1  # closing quote
                value = "".join(chars)
            else:
                value = token()
            current.params[name.lower()] = value
        elif pos < n and header[pos] == "=" and current is None:
            # parameters before any scheme: malformed, skip this pair
            pos += 1
            token()
        else:
            # a new scheme; "token68" values (Basic abc==) are ignored
            pos = after_name
            current = Challenge(header[start:after_name].lower())
            challenges.append(current)
    return challenges


@dataclass(frozen=True)
class Credentials:
    """Credentials for one registry. Secrets never appear in ``repr``."""

    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)  # OAuth2 refresh token
    registry_token: str = field(default="", repr=False)  # bearer token used as is
    server_address: str = ""

    @classmethod
    def from_auth_config(
        cls,
        *,
        username: str = "",
        password: str = "",
        auth: str = "",
        server_address: str = "",
        identity_token: str = "",
        registry_token: str = "",
    ) -> Credentials | None:
        """Credentials from the fields of a CRI ``AuthConfig`` (None when all are empty).

        ``auth`` is base64 of ``user:password`` and is used when username and password
        are not given separately.
        """
        if not username and not password and auth:
            try:
                decoded = base64.b64decode(auth, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise RegistryUnauthenticated(
                    "the auth field of the pull credentials is not base64 of 'user:password'"
                ) from exc
            username, sep, password = decoded.partition(":")
            if not sep:
                raise RegistryUnauthenticated(
                    "the auth field of the pull credentials has no ':' between user and password"
                )
        if not (username or password or identity_token or registry_token):
            return None
        return cls(username, password, identity_token, registry_token, server_address)

    @property
    def has_basic(self) -> bool:
        return bool(self.username or self.password)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def applies_to(self, host: str, registry: str, *, mirror: bool) -> bool:
        """Whether to send these credentials to ``host`` when pulling from ``registry``.

        Without a server address they go to every endpoint of the pull; with one, only
        to that host, or to the registry itself when the address names the registry
        (so credentials for a registry do not leak to its mirrors).
        """
        if not self.server_address:
            return True
        server = self.server_address
        if "://" in server:
            server = server.split("://", 1)[1]
        server = server.split("/", 1)[0]
        docker_hosts = {"docker.io", "index.docker.io", "registry-1.docker.io"}
        if server in docker_hosts:
            server = "docker.io"
        if host in docker_hosts:
            host = "docker.io"
        return server == host or (server == registry and not mirror)

    def fingerprint(self) -> str:
        """A stable hash of these credentials (to key caches without holding secrets)."""
        material = "\0".join(
            [self.username, self.password, self.identity_token, self.registry_token]
        )
        return hashlib.sha256(material.encode()).hexdigest()[:16]
