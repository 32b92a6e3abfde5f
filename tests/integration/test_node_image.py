"""The Helm chart's node image for real: built with buildah (no Docker engine) from a
Debian base made from Debian's archive and the guest assets of this run, pushed to a
registry of its own, pulled back and checked as the nodes' installer reads it; then the
same image under a second tag, and a second release for an upgrade.

The build cache (~/.cache/clearcri/node-image) is the one `make node-image` and the e2e
suite use: the first build on a machine takes minutes (docs/install.md), later ones
seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.node_image import IMAGE_PATH, build_node_image, verify_node_image
from sandbox.guest import GuestAssets
from tests.integration.conftest import GUEST_DIR
from tests.registry import RegistryServer, registry  # noqa: F401

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah builds as root here"),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("buildah", "mmdebstrap", "skopeo")),
        reason="buildah, mmdebstrap and skopeo build and check the node image "
        "(scripts/install-deps.sh installs them)",
    ),
]


def _node_image_mounts() -> list[str]:
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in mounts if "/clearcri/node-image/" in line]


def test_node_image_build_push_and_upgrade(
    registry: RegistryServer,  # noqa: F811
    guest_assets: GuestAssets,
) -> None:
    lines: list[str] = []
    image = build_node_image(registry.host, guest_dir=GUEST_DIR, report=lines.append)
    assert image.reference == f"{registry.host}/{IMAGE_PATH}:{image.tag}"
    assert image.tag.startswith(f"{image.version}-")
    check = verify_node_image(image.reference, guest_dir=GUEST_DIR, report=lines.append)
    assert check.digest == image.digest
    assert check.version == image.version
    assert check.release.startswith(f"{image.version}-")

    # what a client that is no buildah sees in the registry
    inspect = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{image.reference}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert image.digest in inspect and "/opt/clearcri-node/bin" in inspect

    # the same content under another tag: tagged and pushed, nothing built
    again = build_node_image(registry.host, tag="again", guest_dir=GUEST_DIR, report=lines.append)
    assert again.image_id == image.image_id and again.digest == image.digest
    assert any("unchanged" in line for line in lines)

    # a second release: the nodes take it for a new one
    upgrade = build_node_image(
        registry.host, local_version="upgrade", guest_dir=GUEST_DIR, report=lines.append
    )
    assert upgrade.version == f"{image.version}+upgrade"
    assert upgrade.tag != image.tag and upgrade.image_id != image.image_id
    second = verify_node_image(upgrade.reference, guest_dir=GUEST_DIR, report=lines.append)
    assert second.version == upgrade.version
    assert second.release != check.release

    assert _node_image_mounts() == []
