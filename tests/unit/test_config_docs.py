"""docs/config.md lists every key of the daemon configuration with its real default."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from cri.config import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"

_SECTION = re.compile(r"^## `\[([\w.]+)\]`", re.MULTILINE)
_ROW = re.compile(r"^\| `([^`]+)` \| (`[^|]*`|\(none\)) \|", re.MULTILINE)


def documented() -> dict[str, dict[str, str]]:
    """``{table: {key: default as written}}`` from the doc's tables."""
    text = DOC.read_text()
    sections: dict[str, dict[str, str]] = {}
    matches = list(_SECTION.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        rows = _ROW.findall(text, match.end(), end)
        sections[match.group(1)] = {key: default.strip("`") for key, default in rows}
    return sections


def toml_literal(value: Any) -> str:
    if value is None:
        return "(none)"  # an optional key with no default
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path | str):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    raise AssertionError(f"no TOML rendering for {value!r}")


def config_keys(obj: Any, table: str) -> dict[str, dict[str, Any]]:
    """``{table: {key: default}}`` for a config dataclass and the dataclasses inside it."""
    keys: dict[str, dict[str, Any]] = {table: {}}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.update(config_keys(value, f"{table}.{f.name}"))
        else:
            keys[table][f.name] = value
    return keys


def expected() -> dict[str, dict[str, Any]]:
    config = Config()  # the dataclass defaults, before derived defaults are applied
    keys: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys.update(config_keys(value, f.name))
        else:
            keys[f.name] = {}  # a free-form table (registry): documented by hand
    return keys


def test_every_table_and_key_is_documented() -> None:
    docs = documented()
    missing = [
        f"[{table}] {key}"
        for table, keys in expected().items()
        for key in ([] if table not in docs else keys)
        if key not in docs[table]
    ]
    missing += [f"[{table}]" for table in expected() if table not in docs]
    assert not missing, f"add these to docs/config.md: {', '.join(missing)}"


def test_documented_defaults_are_the_real_ones() -> None:
    docs = documented()
    wrong = []
    for table, keys in expected().items():
        for key, default in keys.items():
            written = docs.get(table, {}).get(key)
            if written is not None and written != toml_literal(default):
                wrong.append(f"{table}.{key}: doc says {written}, code has {toml_literal(default)}")
    assert not wrong, "; ".join(wrong)


def test_the_parser_sees_the_tables() -> None:
    docs = documented()
    assert {"daemon", "vm", "streaming", "metrics", "registry"} <= set(docs)
    assert docs["daemon"]["socket"] == '"/run/clearcri/clearcri.sock"'
    assert 'mirrors."<registry>".endpoints' in docs["registry"]
