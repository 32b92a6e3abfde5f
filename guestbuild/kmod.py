"""Kernel modules for the initramfs (only Debian's kernel has any; ours has every driver
built in): a module's ``depends=``, its appended signature, the load order, and
decompressing ``.ko.xz``/``.ko.gz``/``.ko.zst`` files."""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from guestbuild.common import GuestBuildError, decompress_cli
from guestbuild.elf import elf_sections

MODULE_SIG_MARKER = b"~Module signature appended~\n"


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The key=value pairs of a kernel module's .modinfo section."""
    info: dict[str, list[str]] = {}
    for section in elf_sections(ko):
        if section.name == ".modinfo":
            blob = ko[section.offset : section.offset + section.size]
            for item in blob.split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


def strip_module_signature(ko: bytes) -> bytes:
    """``ko`` without its appended signature (unchanged if it has none)."""
    if not ko.endswith(MODULE_SIG_MARKER):
        return ko
    # struct module_signature (12 bytes) ends with the big-endian signature length.
    info_end = len(ko) - len(MODULE_SIG_MARKER)
    (sig_len,) = struct.unpack(">I", ko[info_end - 4 : info_end])
    start = info_end - 12 - sig_len
    if start < 0:
        raise GuestBuildError("malformed module signature")
    return ko[:start]


def module_depends(ko: bytes) -> list[str]:
    deps = modinfo(ko).get("depends", [""])[0]
    return [normalize_module(d) for d in deps.split(",") if d]


def normalize_module(name: str) -> str:
    return name.replace("-", "_")


def module_load_order(
    wanted: Iterable[str],
    depends: Mapping[str, Sequence[str]],
    builtin: Iterable[str] = (),
) -> list[str]:
    """Modules to insmod, dependencies first; built-in modules are skipped.

    ``depends`` maps every available loadable module to its depends= list.
    """
    builtin_set = {normalize_module(m) for m in builtin}
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = normalize_module(name)
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise GuestBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in depends:
            if name in builtin_set:
                state[name] = 2
                return
            raise GuestBuildError(f"kernel module {name} is neither a module nor built in")
        state[name] = 1
        for dep in depends[name]:
            visit(dep, (*chain, name))
        state[name] = 2
        order.append(name)

    for module in wanted:
        visit(module, ())
    return order


def decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if path.name.endswith(".ko.zst"):
        return decompress_cli(["zstd", "-d", "-c", "-q"], data)
    return data
