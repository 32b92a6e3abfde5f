"""The LZ4 legacy decoder (guestbuild/lz4.py)."""

from __future__ import annotations

import struct

import pytest

from guestbuild import lz4


def test_lz4_block_with_overlapping_match() -> None:
    # token: 1 literal, match length 4+6=10 at offset 1 -> "a" * 11, then literals "bc".
    block = bytes([0x16]) + b"a" + struct.pack("<H", 1) + bytes([0x20]) + b"bc"
    out = bytearray()
    lz4.lz4_block_decompress(block, out)
    assert bytes(out) == b"a" * 11 + b"bc"


def test_lz4_rejects_bad_offset() -> None:
    block = bytes([0x10]) + b"a" + struct.pack("<H", 5) + bytes([0x00])
    with pytest.raises(lz4.Lz4Error):
        lz4.lz4_block_decompress(block, bytearray())
