"""Image reference parsing and normalisation (the rules of Docker and containerd)."""

from __future__ import annotations

import pytest

from cri.images.reference import (
    ReferenceError,
    is_image_id,
    parse_reference,
    validate_digest,
)

D = "sha256:" + "a" * 64
D2 = "sha256:" + "0123456789abcdef" * 4

VALID = [
    # (input, canonical string)
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/library/busybox:latest", "docker.io/library/busybox:latest"),
    ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/foo/bar:x", "docker.io/foo/bar:x"),
    ("foo/bar", "docker.io/foo/bar:latest"),
    ("foo/bar/baz", "docker.io/foo/bar/baz:latest"),
    ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
    ("k8s.gcr.io/pause:3.9", "k8s.gcr.io/pause:3.9"),
    ("gcr.io/k8s-staging-cri-tools/test-image-tag:test", None),  # unchanged
    ("localhost/foo", "localhost/foo:latest"),
    ("localhost:5000/foo", "localhost:5000/foo:latest"),
    ("localhost:5000/foo/bar:v1", "localhost:5000/foo/bar:v1"),
    ("127.0.0.1:5000/pause:3.9", "127.0.0.1:5000/pause:3.9"),
    ("[::1]:5000/foo:v1", "[::1]:5000/foo:v1"),
    ("[2001:db8::1]/foo", "[2001:db8::1]/foo:latest"),
    ("my-registry.example.com:443/a/b", "my-registry.example.com:443/a/b:latest"),
    ("Example.com/foo", "Example.com/foo:latest"),
    ("UPPER/foo", "UPPER/foo:latest"),  # an uppercase first part is a host
    (f"busybox@{D}", f"docker.io/library/busybox@{D}"),
    (f"busybox:1.36@{D}", f"docker.io/library/busybox:1.36@{D}"),
    (f"quay.io/coreos/etcd@{D2}", f"quay.io/coreos/etcd@{D2}"),
    ("a/b_c/d__e/f-g/h--i/j.k", "docker.io/a/b_c/d__e/f-g/h--i/j.k:latest"),
    ("foo:_tag", "docker.io/library/foo:_tag"),
    ("foo:" + "t" * 128, "docker.io/library/foo:" + "t" * 128),
    ("foo:V1.2-rc_3", "docker.io/library/foo:V1.2-rc_3"),
    ("foo/" + "a" * 200, "docker.io/foo/" + "a" * 200 + ":latest"),
    ("sha256/foo", "docker.io/sha256/foo:latest"),
    ("a" * 63, "docker.io/library/" + "a" * 63 + ":latest"),
    ("0" * 12, "docker.io/library/000000000000:latest"),
]

INVALID = [
    ("", "empty"),
    (" busybox", "whitespace"),
    ("busybox ", "whitespace"),
    ("Busybox", "lowercase"),
    ("docker.io/Library/busybox", "lowercase"),
    ("foo/Bar", "lowercase"),
    ("busybox:", "invalid tag"),
    ("busybox:-x", "invalid tag"),
    ("busybox:.x", "invalid tag"),
    ("busybox:" + "t" * 129, "invalid tag"),
    ("busybox:a/b", "registry host"),  # "busybox:a" is then a host
    ("busybox@sha256:abc", "invalid digest"),
    ("busybox@sha256:" + "A" * 64, "lowercase hex"),
    ("busybox@sha256:" + "a" * 63, "64 lowercase hex"),
    ("busybox@md5:" + "a" * 32, "unsupported digest algorithm"),
    ("busybox@", "invalid digest"),
    (f"busybox@{D}@{D}", "more than one"),
    ("a" * 64, "image id"),
    ("foo//bar", "repository name"),
    ("foo/bar/", "repository name"),
    ("-foo", "repository name"),
    ("foo-", "repository name"),
    ("foo..bar", "repository name"),
    ("foo___bar", "repository name"),
    ("foo/.bar", "repository name"),
    (":tag", "no repository name"),
    ("@" + D, "no repository name"),
    ("-host.example.com/foo", "registry host"),
    ("host_name:5000/foo", "registry host"),
    ("localhost:port/foo", "registry host"),
    ("example.com/" + "a" * 250, "longer than"),
    ("foo/bar:tag:tag", "repository name"),
    ("http://example.com/foo", "registry host"),
]


@pytest.mark.parametrize(("text", "canonical"), VALID)
def test_valid_references_normalise(text: str, canonical: str | None) -> None:
    ref = parse_reference(text)
    assert str(ref) == (canonical or text)
    again = parse_reference(str(ref))
    assert again == ref


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_references_say_why(text: str, message: str) -> None:
    with pytest.raises(ReferenceError, match=message):
        parse_reference(text)


def test_parts_of_a_reference() -> None:
    ref = parse_reference(f"registry.k8s.io/e2e/busybox:1.29@{D}")
    assert ref.domain == "registry.k8s.io"
    assert ref.path == "e2e/busybox"
    assert ref.tag == "1.29"
    assert ref.digest == D
    assert ref.name == "registry.k8s.io/e2e/busybox"
    assert ref.object == D  # tag+digest: the digest is what is fetched
    assert str(ref.with_digest(D2)) == f"registry.k8s.io/e2e/busybox@{D2}"
    assert str(ref.with_tag("x")) == "registry.k8s.io/e2e/busybox:x"


def test_familiar_forms() -> None:
    assert parse_reference("busybox").familiar == "busybox:latest"
    assert parse_reference("foo/bar:1").familiar == "foo/bar:1"
    assert parse_reference("quay.io/a/b:1").familiar == "quay.io/a/b:1"
    assert parse_reference("library/a/b").familiar == "library/a/b:latest"


def test_without_default_tag() -> None:
    ref = parse_reference("busybox", default_tag=False)
    assert ref.tag is None and ref.object == "latest"


def test_image_ids() -> None:
    assert is_image_id(D)
    assert is_image_id("a" * 64)
    assert not is_image_id("busybox")
    assert not is_image_id("sha256:abc")
    assert not is_image_id("A" * 64)


def test_digest_validation() -> None:
    assert validate_digest(D) == D
    assert validate_digest("sha512:" + "f" * 128)
    with pytest.raises(ReferenceError):
        validate_digest("sha512:" + "f" * 64)
    with pytest.raises(ReferenceError):
        validate_digest("nonsense")
