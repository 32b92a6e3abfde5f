"""LZ4 "legacy" streams, the format of the compressed payload of Debian's kernel,
decompressed in pure Python (the host needs no lz4 tool or module)."""

from __future__ import annotations

import struct

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


class Lz4Error(ValueError):
    """Malformed LZ4 data."""


def lz4_block_decompress(src: bytes | memoryview, out: bytearray) -> None:
    """Append the decompression of one LZ4 block to ``out``."""
    base = len(out)
    pos = 0
    end = len(src)
    while pos < end:
        token = src[pos]
        pos += 1
        literals = token >> 4
        if literals == 15:
            while True:
                if pos >= end:
                    raise Lz4Error("truncated literal length")
                extra = src[pos]
                pos += 1
                literals += extra
                if extra != 255:
                    break
        if pos + literals > end:
            raise Lz4Error("literals run past the block")
        out += src[pos : pos + literals]
        pos += literals
        if pos >= end:
            return  # the last sequence has literals only
        if pos + 2 > end:
            raise Lz4Error("truncated match offset")
        offset = src[pos] | (src[pos + 1] << 8)
        pos += 2
        length = token & 15
        if length == 15:
            while True:
                if pos >= end:
                    raise Lz4Error("truncated match length")
                extra = src[pos]
                pos += 1
                length += extra
                if extra != 255:
                    break
        length += 4
        start = len(out) - offset
        if offset == 0 or start < base:
            raise Lz4Error("match offset out of range")
        if length <= offset:
            out += out[start : start + length]
        else:  # overlapping copy repeats the last `offset` bytes
            pattern = bytes(out[start:])
            out += (pattern * (length // offset + 1))[:length]


def lz4_legacy_decompress(data: bytes) -> bytes:
    """Decompress an LZ4 "legacy" stream (the format of the kernel's lz4 payload).

    Trailing bytes that do not form a whole block (the kernel appends the uncompressed
    size) end the stream.
    """
    if not data.startswith(LZ4_LEGACY_MAGIC):
        raise Lz4Error("not an LZ4 legacy stream")
    view = memoryview(data)
    out = bytearray()
    pos = 4
    while pos + 4 <= len(data):
        if data[pos : pos + 4] == LZ4_LEGACY_MAGIC:  # concatenated stream
            pos += 4
            continue
        (size,) = struct.unpack_from("<I", data, pos)
        if size == 0 or pos + 4 + size > len(data):
            break
        lz4_block_decompress(view[pos + 4 : pos + 4 + size], out)
        pos += 4 + size
    return bytes(out)
