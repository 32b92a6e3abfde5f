"""Image references: parsing and normalisation with the same rules as Docker and containerd.

``busybox`` is ``docker.io/library/busybox:latest``; ``quay.io/x/y@sha256:...`` keeps
its digest; ``name:tag@digest`` is pulled by digest. Grammar (OCI distribution)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path-component ( "/" path-component )*
    domain     := host [ ":" port ]          host: DNS name, IPv4 or "[" IPv6 "]"
    path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})"
_DOMAIN_RE = re.compile(rf"^{_HOST}(?::[0-9]+)?$")
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_IDENTIFIER_RE = re.compile(r"^[a-f0-9]{64}$")

# Digest algorithms we can verify, with the length of their lowercase hex encoding.
DIGEST_ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}


class ReferenceError(ValueError):
    """A malformed image reference; the message says what is wrong with it."""


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``algorithm:hex`` with a supported algorithm."""
    if not _DIGEST_RE.match(digest):
        raise ReferenceError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    algorithm, _, encoded = digest.partition(":")
    length = DIGEST_ALGORITHMS.get(algorithm)
    if length is None:
        raise ReferenceError(
            f"unsupported digest algorithm {algorithm!r} in {digest!r}: "
            f"use one of {', '.join(DIGEST_ALGORITHMS)}"
        )
    if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise ReferenceError(
            f"invalid digest {digest!r}: {algorithm} needs {length} lowercase hex digits"
        )
    return digest


def is_image_id(value: str) -> bool:
    """True for ``sha256:<64 hex>`` or a bare 64-hex string (an image id, not a name)."""
    if value.startswith("sha256:"):
        value = value[len("sha256:") :]
    return bool(_IDENTIFIER_RE.match(value))


@dataclass(frozen=True)
class Reference:
    """A normalised image reference."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``domain/path``: the repository, without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest if there is one, else the tag."""
        if self.digest:
            return self.digest
        return self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.domain, self.path, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, None, digest)

    @property
    def familiar(self) -> str:
        """The short form Docker shows (``busybox:latest``)."""
        path = self.path
        if self.domain == DEFAULT_DOMAIN:
            if (
                path.startswith(OFFICIAL_REPO_PREFIX)
                and "/" not in path[len(OFFICIAL_REPO_PREFIX) :]
            ):
                path = path[len(OFFICIAL_REPO_PREFIX) :]
            text = path
        else:
            text = self.name
        return text + self._suffix()

    def _suffix(self) -> str:
        text = ""
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def __str__(self) -> str:
        return self.name + self._suffix()


def _split_domain(name: str) -> tuple[str, str]:
    slash = name.find("/")
    first = name[:slash] if slash >= 0 else ""
    if slash < 0 or (
        not any(ch in first for ch in ".:") and first != "localhost" and first.lower() == first
    ):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, name[slash + 1 :]
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise ``text``; add the ``latest`` tag when it has neither tag nor digest.

    Raises ReferenceError with a message that names the problem.
    """
    if not text:
        raise ReferenceError("image reference is empty")
    if text != text.strip():
        raise ReferenceError(f"invalid reference {text!r}: surrounding whitespace")
    if _IDENTIFIER_RE.match(text):
        raise ReferenceError(
            f"invalid repository name {text!r}: a 64-character hex string is an image id, "
            "not a name"
        )
    remainder = text
    digest: str | None = None
    if "@" in remainder:
        remainder, _, digest = remainder.partition("@")
        if "@" in digest:
            raise ReferenceError(f"invalid reference {text!r}: more than one '@'")
        validate_digest(digest)
    tag: str | None = None
    colon = remainder.rfind(":")
    if colon > remainder.rfind("/"):
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise ReferenceError(
                f"invalid tag {tag!r} in {text!r}: a tag is up to 128 letters, digits, "
                "'_', '.' or '-' and cannot start with '.' or '-'"
            )
    if not remainder:
        raise ReferenceError(f"invalid reference {text!r}: no repository name")
    domain, path = _split_domain(remainder)
    if not _DOMAIN_RE.match(domain):
        raise ReferenceError(f"invalid registry host {domain!r} in {text!r}")
    if path.lower() != path:
        raise ReferenceError(f"invalid reference {text!r}: repository name must be lowercase")
    for component in path.split("/"):
        if not _PATH_COMPONENT_RE.match(component):
            raise ReferenceError(
                f"invalid repository name {path!r} in {text!r}: each '/'-separated part must be "
                "lowercase letters and digits, joined by '.', '_', '__' or '-'"
            )
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise ReferenceError(
            f"invalid reference {text!r}: repository name longer than "
            f"{NAME_TOTAL_LENGTH_MAX} characters"
        )
    if default_tag and tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)
