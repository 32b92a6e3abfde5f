"""Debian's kernel as the guest boots it: the uncompressed ELF ``vmlinux`` inside a
bzImage (only ``clearcri guest build --kernel debian`` needs it; our own kernel is built
as a vmlinux)."""

from __future__ import annotations

import lzma
import struct
import zlib

from guestbuild.common import GuestBuildError, decompress_cli
from guestbuild.elf import ELF_MAGIC
from guestbuild.lz4 import LZ4_LEGACY_MAGIC, Lz4Error, lz4_legacy_decompress

_PAYLOAD_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lz4", LZ4_LEGACY_MAGIC),
    ("lzma", b"\x5d\x00\x00"),
    ("bzip2", b"BZh"),
)


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if kind == "bzip2":
        import bz2

        return bz2.BZ2Decompressor().decompress(data)
    if kind == "zstd":
        return decompress_cli(["zstd", "-d", "-c", "-q"], data)
    if kind == "lz4":
        return lz4_legacy_decompress(data)
    raise GuestBuildError(f"unsupported kernel compression: {kind}")


def _payload_from_header(image: bytes) -> bytes | None:
    """The compressed kernel as located by the x86 boot protocol header, if present."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    (protocol,) = struct.unpack_from("<H", image, 0x206)
    if protocol < 0x208:
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start : start + length]
    if len(payload) != length or length < 8:
        return None
    return payload


def extract_vmlinux(image: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (or ``image`` if it is an ELF already).

    The payload is taken from the boot header when possible (dropping the 4-byte size
    the kernel build appends), else found by scanning for a compression magic.
    """
    if image.startswith(ELF_MAGIC):
        return image
    candidates: list[tuple[str, bytes, int | None]] = []
    payload = _payload_from_header(image)
    if payload is not None:
        for kind, magic in _PAYLOAD_MAGICS:
            if payload.startswith(magic):
                (size,) = struct.unpack("<I", payload[-4:])
                candidates.append((kind, payload[:-4], size))
                break
    for kind, magic in _PAYLOAD_MAGICS:
        start = image.find(magic)
        while start != -1 and len(candidates) < 16:
            candidates.append((kind, image[start:], None))
            start = image.find(magic, start + 1)
    errors: list[str] = []
    for kind, data, expected_size in candidates:
        try:
            out = _decompress(kind, data)
        except (GuestBuildError, Lz4Error, lzma.LZMAError, zlib.error, OSError, EOFError) as exc:
            errors.append(f"{kind}: {exc}")
            continue
        if not out.startswith(ELF_MAGIC):
            errors.append(f"{kind}: output is not an ELF file")
        elif expected_size is not None and len(out) != expected_size:
            errors.append(f"{kind}: got {len(out)} bytes, the header says {expected_size}")
        else:
            return out
    detail = "; ".join(errors[:4]) or "no compressed payload found"
    raise GuestBuildError(f"cannot extract vmlinux from the kernel image ({detail})")
