"""The node image build's own logic, without buildah: the context it stages, the digest
and tag it derives, the guest assets it accepts, pip's config for the build steps.

The build itself (buildah, a registry, the image's contents) is in
tests/integration/test_node_image.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploy import node_image
from deploy.node_image import (
    NodeImageError,
    build_node_image,
    check_guest,
    context_digest,
    default_tag,
    stage_context,
)
from deploy.node_install import GUEST_FILES
from sandbox.guest import agent_hash
from tests.guest_assets import build_inputs, fake_build

REPO = Path(__file__).resolve().parents[2]


def guest(tmp_path: Path, agent: str) -> Path:
    directory = tmp_path / "guest"
    directory.mkdir()
    fake_build(directory, build_inputs(agent_hash=agent))
    return directory


def test_check_guest_wants_this_agent(tmp_path: Path) -> None:
    current = guest(tmp_path, agent_hash(REPO / "agent"))
    assert check_guest(current, REPO / "agent").kernel_flavor == "debian"
    stale = tmp_path / "stale"
    stale.mkdir()
    fake_build(stale, build_inputs(agent_hash="another agent"))
    with pytest.raises(NodeImageError, match="another agent than this source"):
        check_guest(stale, REPO / "agent")


def test_check_guest_wants_a_complete_build(tmp_path: Path) -> None:
    directory = guest(tmp_path, agent_hash(REPO / "agent"))
    (directory / "os.img").write_bytes(b"short")
    with pytest.raises(NodeImageError, match="does not match its manifest"):
        check_guest(directory, REPO / "agent")
    (directory / "os.img").unlink()
    with pytest.raises(NodeImageError, match="missing"):
        check_guest(directory, REPO / "agent")


def test_stage_context_holds_what_the_containerfile_copies(tmp_path: Path) -> None:
    guest_dir = guest(tmp_path, "a")
    (guest_dir / "cache").mkdir()  # the guest build's own cache stays behind
    context = tmp_path / "context"
    stage_context(REPO, guest_dir, context)
    top = sorted(p.name for p in context.iterdir())
    for line in (REPO / "packaging/Containerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (context / source).exists(), source
    assert ".git" not in top and "tests" not in top and "docs" not in top
    assert not list(context.rglob("__pycache__"))
    staged = sorted(p.name for p in (context / "packaging/guest").iterdir())
    assert staged == sorted(GUEST_FILES)
    assert (context / "packaging/guest/vmlinux").stat().st_ino == (
        (guest_dir / "vmlinux").stat().st_ino
    )  # a hard link, not a copy

    bare = tmp_path / "bare"
    stage_context(REPO, None, bare)
    assert not (bare / "packaging/guest").exists()


def test_context_digest_follows_contents_modes_and_arguments(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    script = tmp_path / "a" / "run.sh"
    script.write_text("echo 1\n")
    first = context_digest(tmp_path, "base=1")
    assert context_digest(tmp_path, "base=1") == first
    assert context_digest(tmp_path, "base=2") != first
    os.chmod(script, 0o755)
    assert context_digest(tmp_path, "base=1") != first
    os.chmod(script, 0o644)
    script.write_text("echo 2\n")
    assert context_digest(tmp_path, "base=1") != first


def test_default_tag_is_a_valid_tag() -> None:
    digest = "0123456789abcdef" * 4
    assert default_tag("0.1.0", digest) == "0.1.0-0123456789ab"
    assert default_tag("0.1.0+upgrade.2", digest) == "0.1.0-upgrade.2-0123456789ab"
    assert node_image._TAG.fullmatch(default_tag("0.1.0+upgrade.2", digest))


@pytest.mark.parametrize("label", ["Upgrade", "up-1", "1+2", ".a", "a..b"])
def test_bad_local_versions_are_refused(label: str, tmp_path: Path) -> None:
    with pytest.raises(NodeImageError, match="local version"):
        build_node_image(None, local_version=label, guest_dir=None, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_bad_tags_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NodeImageError, match="not a valid image tag"):
        build_node_image(None, tag="-x", guest_dir=None, cache_dir=tmp_path)


def test_loopback_registries_go_without_tls() -> None:
    assert node_image._is_loopback("127.0.0.1:5000")
    assert node_image._is_loopback("localhost:5000")
    assert node_image._is_loopback("[::1]:5000")
    assert not node_image._is_loopback("registry.example:5000")
    assert not node_image._is_loopback("10.0.0.1:5000")


def test_pip_config_keeps_the_cache_and_trusts_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.crt"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(node_image, "HOST_CA_BUNDLE", bundle)
    pip_dir = node_image.pip_config(tmp_path / "cache-dir")
    conf = (pip_dir / "pip.conf").read_text()
    assert f"cache-dir = {node_image.PIP_CONFIG_DIR}/cache" in conf
    assert f"cert = {node_image.PIP_CONFIG_DIR}/ca.crt" in conf
    assert (pip_dir / "ca.crt").read_text() == bundle.read_text()
    monkeypatch.setattr(node_image, "HOST_CA_BUNDLE", tmp_path / "none.crt")
    assert "cert" not in (node_image.pip_config(tmp_path / "cache-dir") / "pip.conf").read_text()


def test_steps_are_counted_in_multi_stage_logs(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text("old run\nSTEP 1/1: FROM x\n")
    since = log.stat().st_size
    with log.open("a") as f:
        f.write(
            "[1/2] STEP 1/3: FROM base AS release\n"
            "[1/2] STEP 2/3: RUN apt-get update\n"
            "--> Using cache 0123\n"
            "[1/2] STEP 3/3: COPY cri cri\n"
            "[2/2] STEP 1/1: FROM base\n"
        )
    assert node_image._count_steps(log, since) == (4, 1)


def test_containerfile_base_is_an_argument() -> None:
    text = (REPO / "packaging/Containerfile").read_text()
    assert "ARG BASE_IMAGE=debian:12-slim" in text
    assert [line for line in text.splitlines() if line.startswith("FROM ")] == [
        "FROM ${BASE_IMAGE} AS release",
        "FROM ${BASE_IMAGE}",
    ]
