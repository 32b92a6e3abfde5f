"""Kernel modules: .modinfo, signatures, load order (guestbuild/kmod.py)."""

from __future__ import annotations

import struct

import pytest

from guestbuild import kmod
from guestbuild.common import GuestBuildError


def _elf_with_sections(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 LE file whose only content is the given sections."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    body = bytearray(64)
    offsets: list[tuple[int, int, int]] = []  # name offset, file offset, size
    name_pos = 1
    for name, data in sections.items():
        offsets.append((name_pos, len(body), len(data)))
        name_pos += len(name) + 1
        body += data
    offsets.append((name_pos, len(body), len(names)))
    body += names
    shoff = len(body)
    body += bytes(64)  # null section
    for i, (name_off, off, size) in enumerate(offsets):
        typ = 3 if i == len(offsets) - 1 else 1
        body += struct.pack("<IIQQQQIIQQ", name_off, typ, 0, 0, off, size, 0, 0, 1, 0)
    header = bytearray(b"\x7fELF\x02\x01\x01" + bytes(9))
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 0, 0)
    struct.pack_into("<HHH", header, 0x3A, 64, len(offsets) + 1, len(offsets))
    body[:64] = header
    return bytes(body)


def test_modinfo_and_depends() -> None:
    modinfo = b"license=GPL\0depends=virtio,virtio-ring\0name=virtio_net\0"
    ko = _elf_with_sections({".text": b"\x90" * 16, ".modinfo": modinfo})
    info = kmod.modinfo(ko)
    assert info["name"] == ["virtio_net"]
    assert kmod.module_depends(ko) == ["virtio", "virtio_ring"]
    assert kmod.module_depends(_elf_with_sections({".modinfo": b"depends=\0"})) == []


def test_strip_module_signature() -> None:
    code = b"\x7fELF module body"
    signature = b"S" * 40
    info = bytes(8) + struct.pack(">I", len(signature))
    signed = code + signature + info + b"~Module signature appended~\n"
    assert kmod.strip_module_signature(signed) == code
    assert kmod.strip_module_signature(code) == code


def test_module_load_order_dependencies_first() -> None:
    depends = {
        "virtio_net": ["virtio", "virtio_ring", "net_failover"],
        "net_failover": ["failover"],
        "failover": [],
        "virtio": [],
        "virtio_ring": [],
        "erofs": ["libcrc32c"],
        "libcrc32c": [],
    }
    order = kmod.module_load_order(["virtio_net", "erofs", "virtio"], depends)
    assert sorted(order) == sorted(depends)
    for module, deps in depends.items():
        for dep in deps:
            assert order.index(dep) < order.index(module)
    assert len(order) == len(set(order))


def test_module_load_order_skips_builtin_and_rejects_unknown() -> None:
    depends = {"nd_pmem": ["libnvdimm", "dax"], "libnvdimm": []}
    assert kmod.module_load_order(["nd-pmem"], depends, builtin=["dax"]) == [
        "libnvdimm",
        "nd_pmem",
    ]
    with pytest.raises(GuestBuildError, match="neither a module nor built in"):
        kmod.module_load_order(["nd_pmem"], depends)


def test_module_load_order_rejects_cycles() -> None:
    with pytest.raises(GuestBuildError, match="cycle"):
        kmod.module_load_order(["a"], {"a": ["b"], "b": ["a"]})
