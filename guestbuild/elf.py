"""ELF inspection: section headers (a kernel module's ``.modinfo``), and the dynamic
section and interpreter (what shared libraries a program of the OS image needs)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from guestbuild.common import GuestBuildError

ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class ElfSection:
    name: str
    type: int
    offset: int
    size: int
    link: int


def elf_sections(data: bytes) -> list[ElfSection]:
    """Section headers of a 64-bit little-endian ELF file."""
    if not data.startswith(ELF_MAGIC) or data[4] != 2 or data[5] != 1:
        raise GuestBuildError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw: list[tuple[int, int, int, int, int]] = []
    for i in range(shnum):
        fields = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        raw.append((fields[0], fields[1], fields[4], fields[5], fields[6]))
    if not raw:
        return []
    names_off, names_size = raw[shstrndx][2], raw[shstrndx][3]
    names = data[names_off : names_off + names_size]
    sections = []
    for name_idx, typ, off, size, link in raw:
        name = names[name_idx : names.index(b"\0", name_idx)].decode()
        sections.append(ElfSection(name, typ, off, size, link))
    return sections


@dataclass(frozen=True)
class ElfDynamicInfo:
    needed: tuple[str, ...]
    runpath: tuple[str, ...]
    interpreter: str | None


def elf_dynamic_info(data: bytes) -> ElfDynamicInfo | None:
    """DT_NEEDED, DT_RUNPATH/DT_RPATH and PT_INTERP of an ELF file (None: not dynamic)."""
    sections = elf_sections(data)
    interpreter = None
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 3:  # PT_INTERP
            interpreter = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    dynamic = next((s for s in sections if s.type == 6), None)  # SHT_DYNAMIC
    if dynamic is None:
        return None if interpreter is None else ElfDynamicInfo((), (), interpreter)
    strtab = sections[dynamic.link]
    strings = data[strtab.offset : strtab.offset + strtab.size]

    def string(index: int) -> str:
        return strings[index : strings.index(b"\0", index)].decode()

    needed: list[str] = []
    runpath: list[str] = []
    for off in range(dynamic.offset, dynamic.offset + dynamic.size, 16):
        tag, value = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:
            needed.append(string(value))
        elif tag in (15, 29):  # DT_RPATH, DT_RUNPATH
            runpath.extend(p for p in string(value).split(":") if p)
    return ElfDynamicInfo(tuple(needed), tuple(runpath), interpreter)
