"""An asyncio client for the OCI distribution API (pull, and the push the tests need).

Speaks to registries over HTTPS or plain HTTP (loopback and configured insecure hosts),
answers ``WWW-Authenticate`` challenges (anonymous or credentialed bearer tokens, basic
auth, OAuth2 refresh tokens, pre-issued registry tokens), retries transient failures
with exponential backoff, and checks every manifest it returns against its digest.
Blob bodies are streamed to the caller, who checks digest and size while writing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from cri.images.auth import Challenge, Credentials, parse_www_authenticate
from cri.images.errors import (
    ContentVerificationError,
    ImageError,
    ImageNotFound,
    RegistryPermissionDenied,
    RegistryProtocolError,
    RegistryUnauthenticated,
    RegistryUnavailable,
)
from cri.images.hosts import Endpoint, RegistryHosts, is_loopback_host
from cri.images.manifest import ACCEPT_MANIFESTS, MAX_MANIFEST_BYTES, Descriptor
from cri.images.reference import Reference

log = logging.getLogger(__name__)

USER_AGENT = "clearcri/0.1"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CHUNK = 1 << 20


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def new_hasher(digest: str) -> Any:
    """A hashlib object for the algorithm of ``digest``."""
    return hashlib.new(digest.split(":", 1)[0])


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: str


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    backoff: float = 0.25  # seconds before the 2nd attempt, doubled each time
    max_backoff: float = 5.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_backoff, self.backoff * (2**attempt)))


def _error_text(response: httpx.Response) -> str:
    """The registry's error messages from an error body, or the HTTP reason."""
    try:
        doc = json.loads(response.content[:65536])
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list) and errors:
            parts = []
            for err in errors:
                if isinstance(err, dict):
                    parts.append(f"{err.get('code', '')}: {err.get('message', '')}".strip(": "))
            if parts:
                return "; ".join(parts)
    except (ValueError, httpx.ResponseNotRead):
        pass
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


class RegistryClient:
    """Shared HTTP machinery: connection pools per TLS setting, and a token cache."""

    def __init__(
        self,
        hosts: RegistryHosts | None = None,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.hosts = hosts or RegistryHosts()
        self.retry = retry or RetryPolicy()
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}

    def http(self, verify: bool | str) -> httpx.AsyncClient:
        key = repr(verify)
        client = self._clients.get(key)
        if client is None:
            tls: ssl.SSLContext | bool = (
                ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
            )
            client = httpx.AsyncClient(
                verify=tls,
                timeout=self._timeout,
                follow_redirects=True,
                headers={"User-Agent": USER_AGENT},
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            )
            self._clients[key] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()

    def repositories(
        self,
        ref: Reference,
        credentials: Credentials | None = None,
        *,
        actions: tuple[str, ...] = ("pull",),
    ) -> list[Repository]:
        """One ``Repository`` per endpoint of ``ref``'s registry, in the order to try."""
        return [
            Repository(self, endpoint, ref, credentials, actions)
            for endpoint in self.hosts.endpoints(ref.domain)
        ]

    def cached_token(self, key: tuple[str, str, str]) -> str | None:
        entry = self._tokens.get(key)
        if entry and entry[1] > time.monotonic():
            return entry[0]
        return None

    def store_token(self, key: tuple[str, str, str], header: str, expires_in: float) -> None:
        self._tokens[key] = (header, time.monotonic() + max(10.0, expires_in - 10.0))


class Repository:
    """One repository on one endpoint, with the authorisation state for it."""

    def __init__(
        self,
        client: RegistryClient,
        endpoint: Endpoint,
        ref: Reference,
        credentials: Credentials | None,
        actions: tuple[str, ...],
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.ref = ref
        self.path = ref.path
        if credentials is not None and not credentials.applies_to(
            endpoint.host, ref.domain, mirror=endpoint.mirror
        ):
            credentials = None
        self.credentials = credentials
        self.scope = f"repository:{ref.path}:{','.join(actions)}"
        self._http = client.http(endpoint.verify)
        self._token_key = (
            endpoint.url,
            self.scope,
            credentials.fingerprint() if credentials else "",
        )

    def __repr__(self) -> str:
        return f"Repository({self.endpoint.url}/{self.path})"

    @property
    def where(self) -> str:
        via = f" via mirror {self.endpoint.url}" if self.endpoint.mirror else ""
        return f"{self.ref.name}{via}"

    # -- transport ------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Send with auth and retries; returns a streaming response the caller closes."""
        policy = self.client.retry
        authenticated = False
        attempt = 0
        while True:
            request_headers = dict(headers or {})
            auth = self.client.cached_token(self._token_key)
            if auth:
                request_headers["Authorization"] = auth
            request = self._http.build_request(
                method, url, headers=request_headers, content=content
            )
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                attempt += 1
                if attempt >= policy.attempts:
                    raise RegistryUnavailable(
                        f"cannot reach registry {self.endpoint.url} for {self.ref.name} "
                        f"({type(exc).__name__}: {exc or 'no detail'}) after {attempt} attempts; "
                        "check the network, the registry address and the [registry] mirrors"
                    ) from exc
                await asyncio.sleep(policy.delay(attempt - 1))
                continue
            if response.status_code == 401 and not authenticated:
                challenge_header = response.headers.get("www-authenticate", "")
                await response.aread()
                await response.aclose()
                await self._authorize(challenge_header, response)
                authenticated = True
                continue
            if response.status_code in TRANSIENT_STATUS and attempt + 1 < policy.attempts:
                await response.aread()
                await response.aclose()
                attempt += 1
                delay = policy.delay(attempt - 1)
                retry_after = response.headers.get("retry-after", "")
                if retry_after.isdigit():
                    delay = min(policy.max_backoff, max(delay, float(retry_after)))
                log.info(
                    "registry %s answered %d, retrying in %.2fs",
                    self.endpoint.host,
                    response.status_code,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            return response

    async def _authorize(self, header: str, response: httpx.Response) -> None:
        challenges = parse_www_authenticate(header)
        creds = self.credentials
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None and "realm" in bearer.params:
            token, expires = await self._fetch_token(bearer)
            self.client.store_token(self._token_key, f"Bearer {token}", expires)
            return
        if basic is not None:
            if creds is None or not creds.has_basic:
                raise RegistryUnauthenticated(
                    f"registry {self.endpoint.host} requires a username and password to pull "
                    f"{self.ref.name}; give pull credentials (an image pull secret)"
                )
            self.client.store_token(self._token_key, creds.basic_header(), 3600.0)
            return
        raise RegistryUnauthenticated(
            f"registry {self.endpoint.host} refused access to {self.ref.name} "
            f"({_error_text(response)}) with no usable authentication challenge"
        )

    async def _fetch_token(self, challenge: Challenge) -> tuple[str, float]:
        creds = self.credentials
        if creds is not None and creds.registry_token:
            return creds.registry_token, 300.0
        realm = challenge.params["realm"]
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryProtocolError(
                f"registry {self.endpoint.host} sent an unusable token realm {realm!r}"
            )
        realm_host = parts.netloc
        sends_secret = creds is not None
        if (
            sends_secret
            and parts.scheme == "http"
            and not is_loopback_host(realm_host)
            and realm_host not in self.client.hosts.insecure
        ):
            raise RegistryUnauthenticated(
                f"the token service {realm} of {self.endpoint.host} is plain HTTP; refusing to "
                "send credentials to it (list the host under [registry] insecure to allow it)"
            )
        verify: bool | str = (
            False
            if parts.scheme == "http" or is_loopback_host(realm_host)
            else self.client.hosts.verify_for(realm_host)
        )
        http = self.client.http(verify)
        service = challenge.params.get("service", "")
        scopes = [self.scope]
        if challenge.params.get("scope") and challenge.params["scope"] != self.scope:
            scopes.append(challenge.params["scope"])
        try:
            if creds is not None and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "service": service,
                    "scope": " ".join(scopes),
                    "client_id": "clearcri",
                }
                resp = await http.post(realm, data=form)
            else:
                params: list[tuple[str, str | int | float | bool | None]] = (
                    [("service", service)] if service else []
                )
                params += [("scope", s) for s in scopes]
                headers = {}
                if creds is not None and creds.has_basic:
                    headers["Authorization"] = creds.basic_header()
                resp = await http.get(realm, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise RegistryUnavailable(
                f"cannot reach the token service {realm} of {self.endpoint.host}: {exc}"
            ) from exc
        if resp.status_code in (401, 403):
            if creds is None:
                raise RegistryUnauthenticated(
                    f"registry {self.endpoint.host} does not allow anonymous pulls of "
                    f"{self.ref.name}; give pull credentials (an image pull secret)"
                )
            raise RegistryUnauthenticated(
                f"the token service of {self.endpoint.host} rejected the credentials for "
                f"{self.ref.name} ({_error_text(resp)}); check the user name and password"
            )
        if resp.status_code != 200:
            raise RegistryUnavailable(
                f"the token service {realm} of {self.endpoint.host} answered {_error_text(resp)}"
            )
        try:
            doc = resp.json()
        except ValueError as exc:
            raise RegistryProtocolError(f"token service {realm} sent invalid JSON") from exc
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryProtocolError(f"token service {realm} sent no token")
        expires = doc.get("expires_in", 60)
        return token, float(expires) if isinstance(expires, int | float) else 60.0

    def _status_error(self, response: httpx.Response, what: str) -> ImageError:
        detail = _error_text(response)
        code = response.status_code
        if code == 401:
            if self.credentials is None:
                return RegistryUnauthenticated(
                    f"registry {self.endpoint.host} requires authentication for {what} "
                    f"({detail}); give pull credentials (an image pull secret)"
                )
            return RegistryUnauthenticated(
                f"registry {self.endpoint.host} rejected the credentials for {what} ({detail}); "
                "check the user name, password or token"
            )
        if code == 403:
            return RegistryPermissionDenied(
                f"registry {self.endpoint.host} denies access to {what} ({detail}); the "
                "credentials are valid but lack pull permission on this repository"
            )
        if code == 404:
            return ImageNotFound(f"{what} not found on {self.endpoint.url} ({detail})")
        if code in TRANSIENT_STATUS:
            return RegistryUnavailable(
                f"registry {self.endpoint.host} keeps failing for {what} ({detail})"
            )
        return RegistryProtocolError(f"registry {self.endpoint.host} answered {detail} for {what}")

    # -- pull -----------------------------------------------------------------------

    async def get_manifest(
        self, obj: str, *, expected: Descriptor | None = None
    ) -> FetchedManifest:
        """Fetch manifest or index ``obj`` (a tag or digest) and check its digest."""
        what = (
            f"manifest {self.ref.name}:{obj}"
            if ":" not in obj
            else f"manifest {obj} of {self.ref.name}"
        )
        url = self.endpoint.api(f"{self.path}/manifests/{obj}")
        response = await self._send("GET", url, headers={"Accept": ACCEPT_MANIFESTS})
        try:
            if response.status_code != 200:
                await response.aread()
                raise self._status_error(response, what)
            length = int(response.headers.get("content-length", "0") or 0)
            if length > MAX_MANIFEST_BYTES:
                raise RegistryProtocolError(f"{what} is {length} bytes, over the 4 MiB limit")
            chunks: list[bytes] = []
            total = 0
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > MAX_MANIFEST_BYTES:
                    raise RegistryProtocolError(f"{what} is over the 4 MiB limit")
                chunks.append(chunk)
        except httpx.TransportError as exc:
            raise RegistryUnavailable(
                f"reading {what} from {self.endpoint.url} failed: {exc}"
            ) from exc
        finally:
            await response.aclose()
        data = b"".join(chunks)
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        algorithm = obj.split(":", 1)[0] if ":" in obj else "sha256"
        digest = digest_bytes(data, algorithm)
        if ":" in obj and digest != obj:
            raise ContentVerificationError(
                f"{what} from {self.endpoint.url} does not match its digest (got {digest}); "
                "the registry or a proxy corrupted it; nothing was stored"
            )
        if expected is not None and (digest != expected.digest or len(data) != expected.size):
            raise ContentVerificationError(
                f"{what} from {self.endpoint.url} does not match its descriptor "
                f"({digest}, {len(data)} bytes; want {expected.digest}, {expected.size} bytes)"
            )
        header_digest = response.headers.get("docker-content-digest", "")
        if ":" not in obj and header_digest.startswith(f"{algorithm}:") and header_digest != digest:
            raise ContentVerificationError(
                f"{what} from {self.endpoint.url} has digest {digest} but the registry "
                f"announced {header_digest}; nothing was stored"
            )
        return FetchedManifest(data, media_type, digest)

    @asynccontextmanager
    async def open_blob(self, desc: Descriptor) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream the body of blob ``desc``; the caller verifies digest and size."""
        what = f"blob {desc.digest} of {self.ref.name}"
        url = self.endpoint.api(f"{self.path}/blobs/{desc.digest}")
        response = await self._send("GET", url)
        try:
            if response.status_code != 200:
                await response.aread()
                raise self._status_error(response, what)
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != desc.size:
                raise ContentVerificationError(
                    f"{what} from {self.endpoint.url} is {length} bytes, the manifest says "
                    f"{desc.size}; nothing was stored"
                )
            yield response.aiter_bytes(CHUNK)
        finally:
            await response.aclose()

    async def get_blob(self, desc: Descriptor, limit: int) -> bytes:
        """A small blob (an image config) in memory, verified."""
        if desc.size > limit:
            raise RegistryProtocolError(
                f"blob {desc.digest} of {self.ref.name} is {desc.size} bytes, over {limit}"
            )
        hasher = new_hasher(desc.digest)
        chunks: list[bytes] = []
        total = 0
        try:
            async with self.open_blob(desc) as body:
                async for chunk in body:
                    total += len(chunk)
                    if total > desc.size:
                        break
                    hasher.update(chunk)
                    chunks.append(chunk)
        except httpx.TransportError as exc:
            raise RegistryUnavailable(
                f"reading blob {desc.digest} from {self.endpoint.url} failed: {exc}"
            ) from exc
        check_content(desc, total, hasher, f"blob {desc.digest} of {self.where}")
        return b"".join(chunks)

    # -- push (used by tests and tools) ----------------------------------------------

    async def blob_exists(self, digest: str) -> bool:
        url = self.endpoint.api(f"{self.path}/blobs/{digest}")
        response = await self._send("HEAD", url)
        await response.aclose()
        return response.status_code == 200

    async def push_blob(self, data: bytes, digest: str | None = None) -> str:
        """Upload ``data`` as one blob (monolithic upload); return its digest."""
        digest = digest or digest_bytes(data)
        if await self.blob_exists(digest):
            return digest
        start = await self._send("POST", self.endpoint.api(f"{self.path}/blobs/uploads/"))
        await start.aread()
        await start.aclose()
        if start.status_code != 202 or "location" not in start.headers:
            raise self._status_error(start, f"upload to {self.ref.name}")
        location = str(start.url.join(start.headers["location"]))
        separator = "&" if "?" in location else "?"
        done = await self._send(
            "PUT",
            f"{location}{separator}digest={digest}",
            headers={"Content-Type": "application/octet-stream"},
            content=data,
        )
        await done.aread()
        await done.aclose()
        if done.status_code not in (201, 204):
            raise self._status_error(done, f"upload of {digest} to {self.ref.name}")
        return digest

    async def push_manifest(self, obj: str, data: bytes, media_type: str) -> str:
        """Store manifest ``data`` under tag or digest ``obj``; return its digest."""
        response = await self._send(
            "PUT",
            self.endpoint.api(f"{self.path}/manifests/{obj}"),
            headers={"Content-Type": media_type},
            content=data,
        )
        await response.aread()
        await response.aclose()
        if response.status_code not in (200, 201, 202):
            raise self._status_error(response, f"manifest {obj} of {self.ref.name}")
        return digest_bytes(data)


def check_content(desc: Descriptor, size: int, hasher: Any, what: str) -> None:
    """Raise ContentVerificationError unless ``size`` and the hash match ``desc``."""
    if size != desc.size:
        raise ContentVerificationError(
            f"{what} is {'longer' if size > desc.size else 'shorter'} than the {desc.size} "
            "bytes its manifest says; nothing was stored"
        )
    algorithm = desc.digest.split(":", 1)[0]
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != desc.digest:
        raise ContentVerificationError(
            f"{what} does not match its digest (got {actual}); the registry or a proxy "
            "corrupted it; nothing was stored"
        )
