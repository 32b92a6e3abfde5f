"""The template store drops templates no VM will be cloned from again."""

from __future__ import annotations

import json
from pathlib import Path

from sandbox.template import INFO_FILE, TemplateStore


def _template(root: Path, key: str, created: float, assets: str | None) -> Path:
    directory = root / key
    directory.mkdir(parents=True)
    info: dict[str, object] = {"key": key, "boot_seconds": 2.0, "created_at": created}
    if assets is not None:
        info["assets"] = assets
    (directory / INFO_FILE).write_text(json.dumps(info))
    (directory / "ram").write_bytes(b"\0" * 4096)
    return directory


def test_templates_of_another_vmm_or_guest_go_the_others_stay_up_to_keep(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    store = TemplateStore(root, "qemu-system-x86_64", keep=3)
    _template(root, "current", 10.0, "new")
    _template(root, "same-1", 9.0, "new")
    _template(root, "same-2", 8.0, "new")
    _template(root, "same-3", 7.0, "new")
    _template(root, "older-vmm", 11.0, "old")
    _template(root, "before-assets", 12.0, None)  # a template of an earlier version
    (root / ".being-built.123.abcd").mkdir()
    store._prune(keep="current", assets="new")
    assert sorted(p.name for p in root.iterdir()) == [
        ".being-built.123.abcd",
        "current",
        "same-1",
        "same-2",
    ]
