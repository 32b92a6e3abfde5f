"""Point a kubelet's configuration file at a CRI runtime.

``python3 -m deploy.kubelet_runtime --config /var/lib/kubelet/config.yaml`` sets
``containerRuntimeEndpoint`` and ``imageServiceEndpoint`` of the KubeletConfiguration in
that file to clearcri's socket (``--endpoint`` for another), keeps every other key, keeps
the file's format (YAML or JSON), and saves the previous file beside it as
``<file>.before-clearcri`` the first time. ``--endpoint`` with the old runtime's socket
switches back. It does not restart kubelet: that is the node's service manager's job
(docs/install.md, "Point kubelet at clearcri", has the whole procedure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

RUNTIME_ENDPOINT = "unix:///run/clearcri/clearcri.sock"
ENDPOINT_KEYS = ("containerRuntimeEndpoint", "imageServiceEndpoint")
BACKUP_SUFFIX = ".before-clearcri"


class KubeletConfigError(Exception):
    pass


def _load(text: str, path: Path) -> tuple[dict[str, Any], bool]:
    """The configuration and whether the file is JSON."""
    try:
        data = json.loads(text)
        is_json = True
    except json.JSONDecodeError:
        try:
            import yaml
        except ImportError as exc:
            raise KubeletConfigError(
                f"{path} is not JSON, and reading YAML needs PyYAML (pip install PyYAML)"
            ) from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise KubeletConfigError(f"{path} is neither JSON nor YAML: {exc}") from exc
        is_json = False
    if not isinstance(data, dict) or data.get("kind") != "KubeletConfiguration":
        raise KubeletConfigError(f"{path} holds no KubeletConfiguration (kind is missing or other)")
    return data, is_json


def _dump(data: dict[str, Any], is_json: bool) -> str:
    if is_json:
        return json.dumps(data, indent=1) + "\n"
    import yaml

    return str(yaml.safe_dump(data, sort_keys=False))


def set_endpoint(path: Path, endpoint: str) -> bool:
    """Set both endpoints in ``path``; False when they already were ``endpoint``."""
    if not endpoint.startswith(("unix://", "npipe://", "tcp://")):
        raise KubeletConfigError(
            f"endpoint {endpoint!r} has no scheme: write it as unix:///path/to/socket"
        )
    try:
        text = path.read_text()
    except OSError as exc:
        raise KubeletConfigError(f"cannot read {path}: {exc.strerror}") from exc
    data, is_json = _load(text, path)
    if all(data.get(key) == endpoint for key in ENDPOINT_KEYS):
        return False
    for key in ENDPOINT_KEYS:
        data[key] = endpoint
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if not backup.exists():
        backup.write_text(text)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(_dump(data, is_json))
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m deploy.kubelet_runtime",
        description="set the CRI endpoint in a kubelet configuration file",
    )
    parser.add_argument("--config", required=True, help="kubelet's --config file")
    parser.add_argument("--endpoint", default=RUNTIME_ENDPOINT, help="CRI socket URL")
    args = parser.parse_args(argv)
    try:
        changed = set_endpoint(Path(args.config), args.endpoint)
    except KubeletConfigError as exc:
        print(f"kubelet_runtime: {exc}", file=sys.stderr)
        return 2
    if changed:
        print(f"{args.config}: the runtime endpoint is now {args.endpoint}; restart kubelet")
    else:
        print(f"{args.config}: the runtime endpoint already is {args.endpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
